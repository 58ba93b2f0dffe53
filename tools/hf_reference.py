#!/usr/bin/python3
"""Tiny random Hugging Face checkpoints (Llama family, GPT-2, BERT, RoBERTa) and their outputs.

    /usr/bin/python3 tools/hf_reference.py --out build/fixtures/hf

For each case it writes a folder in HF's exact layout (config.json,
model.safetensors, or shards with model.safetensors.index.json) and
<case>/expected.safetensors with the inputs (input_ids, attention_mask) and the
output (in the file's dtype; an F16 file's in fp32, as CPUs lack fp16 matmuls):
`logits` of the causal LM or the sequence classifier, or the encoder's
`last_hidden_state`. They come from the plain-PyTorch models below, written from
transformers' modeling_llama.py / modeling_mistral.py / modeling_qwen2.py
(eager attention, RMSNorm in fp32, RoPE with rope_theta and llama3 scaling,
SwiGLU, GQA, sliding window), modeling_gpt2.py (Conv1D, gelu_new, learned
positions) and modeling_bert.py / modeling_roberta.py (post-norm, token types,
RoBERTa's padding-aware positions, pooler and classification heads),
independent of the C++ code. Runs on Debian's
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


def llama_body(cfg, sd, ids, mask):
    """Hidden states [B, T, hidden] of LlamaModel / MistralModel / Qwen2Model (eager, no cache)."""
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
    return rms_norm(x, sd["model.norm.weight"], cfg["rms_norm_eps"])



def min_bias(allowed, dtype):
    """0 where allowed, torch.finfo(dtype).min elsewhere (transformers' additive masks)."""
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def activation(name, x):
    if name == "gelu":
        return F.gelu(x)
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
    raise ValueError(name)


def layer_norm(sd, name, x, eps):
    return F.layer_norm(x, (x.shape[-1],), sd[name + ".weight"], sd[name + ".bias"], eps)


def conv1d(sd, name, x):
    """transformers' Conv1D: weight [in, out]."""
    return x @ sd[name + ".weight"] + sd[name + ".bias"]


def gpt2_body(cfg, sd, ids, mask):
    """Hidden states of GPT2Model (eager, causal, positions 0..T-1)."""
    B, T = ids.shape
    H, E = cfg["n_head"], cfg["n_embd"]
    D = E // H
    x = F.embedding(ids, sd["transformer.wte.weight"]) + F.embedding(torch.arange(T)[None], sd["transformer.wpe.weight"])
    allowed = (torch.arange(T)[None, :] <= torch.arange(T)[:, None])[None, None] & mask[:, None, None, :].bool()
    bias = min_bias(allowed, x.dtype)
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        h = layer_norm(sd, p + "ln_1", x, cfg["layer_norm_epsilon"])
        q, k, v = conv1d(sd, p + "attn.c_attn", h).split(E, dim=2)
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))
        scaling = D ** -0.5 / ((i + 1) if cfg.get("scale_attn_by_inverse_layer_idx") else 1)
        w = F.softmax(q @ k.transpose(-1, -2) * scaling + bias, dim=-1).type(v.dtype)
        x = x + conv1d(sd, p + "attn.c_proj", (w @ v).transpose(1, 2).reshape(B, T, E))
        h = layer_norm(sd, p + "ln_2", x, cfg["layer_norm_epsilon"])
        x = x + conv1d(sd, p + "mlp.c_proj", activation(cfg["activation_function"], conv1d(sd, p + "mlp.c_fc", h)))
    return layer_norm(sd, "transformer.ln_f", x, cfg["layer_norm_epsilon"])


def bert_body(cfg, sd, ids, mask, prefix):
    """last_hidden_state of BertModel / RobertaModel (eager, absolute positions)."""
    B, T = ids.shape
    H, E = cfg["num_attention_heads"], cfg["hidden_size"]
    D, eps = E // H, cfg["layer_norm_eps"]
    p = prefix + "embeddings."
    if cfg["model_type"] == "roberta":  # create_position_ids_from_input_ids
        is_token = ids.ne(cfg["pad_token_id"]).int()
        positions = (torch.cumsum(is_token, dim=1).type_as(is_token) * is_token).long() + cfg["pad_token_id"]
    else:
        positions = torch.arange(T)[None]
    x = (F.embedding(ids, sd[p + "word_embeddings.weight"]) + F.embedding(torch.zeros_like(ids), sd[p + "token_type_embeddings.weight"])
         + F.embedding(positions, sd[p + "position_embeddings.weight"]))
    x = layer_norm(sd, p + "LayerNorm", x, eps)
    bias = min_bias(mask[:, None, None, :].bool(), x.dtype)
    for i in range(cfg["num_hidden_layers"]):
        p = f"{prefix}encoder.layer.{i}."
        q, k, v = (linear(sd, p + "attention.self." + n, x).view(B, T, H, D).transpose(1, 2) for n in ("query", "key", "value"))
        w = F.softmax(q @ k.transpose(2, 3) * D ** -0.5 + bias, dim=-1)
        a = linear(sd, p + "attention.output.dense", (w @ v).transpose(1, 2).reshape(B, T, E))
        x = layer_norm(sd, p + "attention.output.LayerNorm", a + x, eps)
        h = activation(cfg["hidden_act"], linear(sd, p + "intermediate.dense", x))
        x = layer_norm(sd, p + "output.LayerNorm", linear(sd, p + "output.dense", h) + x, eps)
    return x


def last_token(hidden, ids, pad):
    """The rightmost token that is not pad (transformers' *ForSequenceClassification of decoders)."""
    index = (torch.arange(ids.shape[1])[None] * ids.ne(pad).long()).argmax(-1)
    return hidden[torch.arange(ids.shape[0]), index]


def forward(cfg, sd, ids, mask, task):
    """The case's output: causal-LM logits [B, T, V], classifier logits [B, labels], or last_hidden_state."""
    t = cfg["model_type"]
    if t == "gpt2":
        h = gpt2_body(cfg, sd, ids, mask)
        if task == "causal":
            return F.linear(h, sd["transformer.wte.weight"])  # tied
        return F.linear(last_token(h, ids, cfg["pad_token_id"]), sd["score.weight"])
    if t in ("bert", "roberta"):
        if task == "base":
            return bert_body(cfg, sd, ids, mask, "")
        h = bert_body(cfg, sd, ids, mask, t + ".")
        if t == "bert":
            pooled = torch.tanh(linear(sd, "bert.pooler.dense", h[:, 0]))
            return linear(sd, "classifier", pooled)
        return linear(sd, "classifier.out_proj", torch.tanh(linear(sd, "classifier.dense", h[:, 0])))
    h = llama_body(cfg, sd, ids, mask)
    if task == "seqcls":
        return F.linear(last_token(h, ids, cfg["pad_token_id"]), sd["score.weight"])
    head = sd["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else sd["lm_head.weight"]
    return F.linear(h, head)


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


def gpt2_config(**extra):
    cfg = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 96, "n_positions": 32,
           "n_embd": 32, "n_layer": 2, "n_head": 4, "n_inner": None, "activation_function": "gelu_new",
           "layer_norm_epsilon": 1e-5, "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1,
           "scale_attn_weights": True, "bos_token_id": 95, "eos_token_id": 95, "torch_dtype": "float32"}
    cfg.update(extra)
    return cfg


def bert_config(model_type, **extra):
    cfg = {"model_type": model_type, "architectures": ["BertModel" if model_type == "bert" else "RobertaModel"],
           "vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
           "intermediate_size": 48, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
           "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 40 if model_type == "roberta" else 32,
           "type_vocab_size": 2 if model_type == "bert" else 1, "layer_norm_eps": 1e-12,
           "pad_token_id": 0 if model_type == "bert" else 1, "position_embedding_type": "absolute",
           "torch_dtype": "float32"}
    cfg.update(extra)
    return cfg


def labels(n):
    return {"id2label": {str(i): f"LABEL_{i}" for i in range(n)}, "label2id": {f"LABEL_{i}": i for i in range(n)}}


class State:
    """A random state dict (seeded by the config) in transformers' names."""

    def __init__(self, cfg):
        self.g = torch.Generator().manual_seed(zlib.crc32(json.dumps(cfg, sort_keys=True).encode()))
        self.sd = {}

    def randn(self, *shape, scale=1.0):
        return torch.randn(*shape, generator=self.g) * scale

    def lin(self, name, n_in, n_out, bias=True, conv1d=False):
        w = self.randn(n_out, n_in, scale=1 / math.sqrt(n_in))
        self.sd[name + ".weight"] = w.t().contiguous() if conv1d else w
        if bias:
            self.sd[name + ".bias"] = self.randn(n_out, scale=0.1)

    def norm(self, name, n, bias=True):
        self.sd[name + ".weight"] = 1 + self.randn(n, scale=0.1)
        if bias:
            self.sd[name + ".bias"] = self.randn(n, scale=0.1)


def llama_state(cfg, task, st):
    H, KV, hidden = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    D = cfg.get("head_dim") or hidden // H
    qkv_bias = cfg["model_type"] == "qwen2" or cfg.get("attention_bias", False)
    o_bias = cfg["model_type"] != "qwen2" and cfg.get("attention_bias", False)
    mlp_bias = cfg.get("mlp_bias", False)
    st.sd["model.embed_tokens.weight"] = st.randn(cfg["vocab_size"], hidden, scale=0.5)
    st.norm("model.norm", hidden, bias=False)
    if task == "seqcls":
        st.sd["score.weight"] = st.randn(len(cfg["id2label"]), hidden, scale=0.2)
    elif not cfg["tie_word_embeddings"]:
        st.sd["lm_head.weight"] = st.randn(cfg["vocab_size"], hidden, scale=0.2)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        st.lin(p + "self_attn.q_proj", hidden, H * D, qkv_bias)
        st.lin(p + "self_attn.k_proj", hidden, KV * D, qkv_bias)
        st.lin(p + "self_attn.v_proj", hidden, KV * D, qkv_bias)
        st.lin(p + "self_attn.o_proj", H * D, hidden, o_bias)
        st.lin(p + "mlp.gate_proj", hidden, cfg["intermediate_size"], mlp_bias)
        st.lin(p + "mlp.up_proj", hidden, cfg["intermediate_size"], mlp_bias)
        st.lin(p + "mlp.down_proj", cfg["intermediate_size"], hidden, mlp_bias)
        st.norm(p + "input_layernorm", hidden, bias=False)
        st.norm(p + "post_attention_layernorm", hidden, bias=False)


def gpt2_state(cfg, task, st):
    E, inner = cfg["n_embd"], cfg.get("n_inner") or 4 * cfg["n_embd"]
    st.sd["transformer.wte.weight"] = st.randn(cfg["vocab_size"], E, scale=0.5)
    st.sd["transformer.wpe.weight"] = st.randn(cfg["n_positions"], E, scale=0.1)
    st.norm("transformer.ln_f", E)
    if task == "seqcls":
        st.sd["score.weight"] = st.randn(len(cfg["id2label"]), E, scale=0.2)
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        st.norm(p + "ln_1", E)
        st.lin(p + "attn.c_attn", E, 3 * E, conv1d=True)
        st.lin(p + "attn.c_proj", E, E, conv1d=True)
        st.norm(p + "ln_2", E)
        st.lin(p + "mlp.c_fc", E, inner, conv1d=True)
        st.lin(p + "mlp.c_proj", inner, E, conv1d=True)


def bert_state(cfg, task, st):
    prefix = "" if task == "base" else cfg["model_type"] + "."
    E, inner = cfg["hidden_size"], cfg["intermediate_size"]
    p = prefix + "embeddings."
    st.sd[p + "word_embeddings.weight"] = st.randn(cfg["vocab_size"], E, scale=0.5)
    st.sd[p + "position_embeddings.weight"] = st.randn(cfg["max_position_embeddings"], E, scale=0.1)
    st.sd[p + "token_type_embeddings.weight"] = st.randn(cfg["type_vocab_size"], E, scale=0.1)
    st.norm(p + "LayerNorm", E)
    for i in range(cfg["num_hidden_layers"]):
        p = f"{prefix}encoder.layer.{i}."
        for n in ("query", "key", "value"):
            st.lin(p + "attention.self." + n, E, E)
        st.lin(p + "attention.output.dense", E, E)
        st.norm(p + "attention.output.LayerNorm", E)
        st.lin(p + "intermediate.dense", E, inner)
        st.lin(p + "output.dense", inner, E)
        st.norm(p + "output.LayerNorm", E)
    n = len(cfg.get("id2label", {}))
    if cfg["model_type"] == "bert" or task == "base":
        st.lin(prefix + "pooler.dense", E, E)
    if task == "seqcls" and cfg["model_type"] == "bert":
        st.lin("classifier", E, n)
    elif task == "seqcls":
        st.lin("classifier.dense", E, E)
        st.lin("classifier.out_proj", E, n)


def random_state(cfg, task, dtype):
    st = State(cfg)
    {"gpt2": gpt2_state, "bert": bert_state, "roberta": bert_state}.get(cfg["model_type"], llama_state)(cfg, task, st)
    return {k: v.to(dtype) for k, v in st.sd.items()}


def as_hub_file(cfg, sd):
    """GPT-2 as the Hub's gpt2 files are: keys without "transformer.", and the causal-mask buffers old files keep."""
    out = {k[len("transformer."):]: v for k, v in sd.items()}
    for i in range(cfg["n_layer"]):
        n = cfg["n_positions"]
        out[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n).to(sd["transformer.wte.weight"].dtype)
    return out


def inputs(cfg, task, pad):
    """2 rows of 7: the second padded (left for decoders, right for encoders) with pad ids where masked."""
    g = torch.Generator().manual_seed(7)
    low = 0 if pad is None else pad + 1
    ids = torch.randint(low, cfg["vocab_size"], (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.int64)
    padded = slice(5, 7) if cfg["model_type"] in ("bert", "roberta") else slice(0, 2)
    mask[1, padded] = 0
    if pad is not None:
        ids[1, padded] = pad
    return ids, mask


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
CASES = {  # name: (config, dtype, shards, task: causal | seqcls | base)
    "llama": (base_config("llama", rope_scaling=LLAMA3_ROPE, rope_theta=500000.0), torch.float32, 1, "causal"),
    "llama_bias_headdim": (base_config("llama", attention_bias=True, mlp_bias=True, head_dim=16), torch.float32, 1, "causal"),
    "llama_sharded": (base_config("llama"), torch.float32, 3, "causal"),
    "llama_bf16": (base_config("llama", torch_dtype="bfloat16", rope_scaling=LLAMA3_ROPE), torch.bfloat16, 1, "causal"),
    "llama_f16": (base_config("llama", torch_dtype="float16"), torch.float16, 1, "causal"),
    "mistral": (base_config("mistral", sliding_window=3, rope_theta=1000000.0), torch.float32, 1, "causal"),
    "qwen2": (base_config("qwen2", tie_word_embeddings=True, rope_theta=1000000.0, use_sliding_window=False,
                          sliding_window=None, max_window_layers=2), torch.float32, 1, "causal"),
    "llama_seqcls": (base_config("llama", architectures=["LlamaForSequenceClassification"], pad_token_id=0, **labels(3)),
                     torch.float32, 1, "seqcls"),
    "gpt2": (gpt2_config(), torch.float32, 1, "causal"),
    "gpt2_layer_scaled_bf16": (gpt2_config(scale_attn_by_inverse_layer_idx=True, torch_dtype="bfloat16"), torch.bfloat16, 1,
                               "causal"),
    "gpt2_seqcls": (gpt2_config(architectures=["GPT2ForSequenceClassification"], pad_token_id=0, **labels(2)),
                    torch.float32, 2, "seqcls"),
    "bert_seqcls": (bert_config("bert", architectures=["BertForSequenceClassification"], **labels(3)), torch.float32, 1,
                    "seqcls"),
    "bert_base": (bert_config("bert"), torch.float32, 1, "base"),
    "bert_base_bf16": (bert_config("bert", torch_dtype="bfloat16"), torch.bfloat16, 1, "base"),
    "roberta_seqcls": (bert_config("roberta", architectures=["RobertaForSequenceClassification"], hidden_act="gelu_new",
                                   **labels(2)), torch.float32, 1, "seqcls"),
}


def write_checkpoint(folder, sd, shards):
    if shards == 1:
        write_safetensors(os.path.join(folder, "model.safetensors"), sd)
        return
    names, weight_map = sorted(sd), {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: sd[n] for n in names[s::shards]}
        write_safetensors(os.path.join(folder, file), part)
        weight_map.update({n: file for n in part})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def write_case(out, name, cfg, dtype, shards, task):
    folder = os.path.join(out, name)
    os.makedirs(folder, exist_ok=True)
    sd = random_state(cfg, task, dtype)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    file_sd = dict(sd)
    if cfg["model_type"] == "gpt2" and task == "causal":
        file_sd = as_hub_file(cfg, sd)
    if task == "base":
        file_sd["embeddings.position_ids"] = torch.arange(cfg["max_position_embeddings"])[None]  # as old BERT files
    write_checkpoint(folder, file_sd, shards)
    ids, mask = inputs(cfg, task, cfg.get("pad_token_id"))
    with torch.no_grad():  # CPU has no fp16 matmul (torch 1.13, LibTorch 1.13): an F16 file is computed in fp32
        compute = {k: v.float() for k, v in sd.items()} if dtype == torch.float16 else sd
        output = forward(cfg, compute, ids, mask, task)
    key = "last_hidden_state" if task == "base" else "logits"
    write_safetensors(os.path.join(folder, "expected.safetensors"), {"input_ids": ids, "attention_mask": mask, key: output})


def read_safetensors(path):
    """The tensors of a safetensors file (F32, F16, BF16, I64), read by hand as write_safetensors writes them."""
    types = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        out[name] = torch.frombuffer(bytearray(data[begin:end]), dtype=types[info["dtype"]]).reshape(info["shape"])
    return out


def write_real(folder, out):
    """A real BERT folder (the pinned all-MiniLM-L6-v2): last_hidden_state of two sentences given as
    token ids (whole words of its vocabulary), the second right-padded, and the sentence-transformers
    embedding (mean over the tokens, L2-normalised) -> OUT/<folder name>.expected.safetensors."""
    cfg = json.load(open(os.path.join(folder, "config.json")))
    vocab = json.load(open(os.path.join(folder, "tokenizer.json")))["model"]["vocab"]
    rows = [["[CLS]", "the", "model", "runs", "in", "c", "+", "+", "without", "python", ".", "[SEP]"],
            ["[CLS]", "free", "money", "!", "click", "here", "[SEP]", "[PAD]", "[PAD]", "[PAD]", "[PAD]", "[PAD]"]]
    ids = torch.tensor([[vocab[w] for w in row] for row in rows])
    mask = ids.ne(vocab["[PAD]"]).long()
    sd = read_safetensors(os.path.join(folder, "model.safetensors"))
    with torch.no_grad():
        hidden = bert_body(cfg, sd, ids, mask, "")
        summed = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        embedding = F.normalize(summed, dim=-1)
    name = os.path.basename(os.path.normpath(folder))
    write_safetensors(os.path.join(out, name + ".expected.safetensors"),
                      {"input_ids": ids, "attention_mask": mask, "last_hidden_state": hidden, "sentence_embedding": embedding})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--real", action="append", default=[], help="a real BERT folder to compute outputs of")
    args = parser.parse_args()
    for name, (cfg, dtype, shards, task) in CASES.items():
        write_case(args.out, name, cfg, dtype, shards, task)
    for folder in args.real:
        write_real(folder, args.out)
    print(f"wrote {len(CASES)} HF checkpoints and {len(args.real)} real outputs to {args.out}")


if __name__ == "__main__":
    main()
