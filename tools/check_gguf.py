#!/usr/bin/env python3
"""RealGguf (tests/test_gguf.cpp): llama.cpp's own GGUF reader (gguf from PyPI)
parses the LoRA adapters peft-cpp exported, and everything in them is rebuilt
here independently from the adapter folder with numpy:

- metadata: general.architecture (gguf's MODEL_ARCH_NAMES), general.type "adapter",
  adapter.type "lora", adapter.lora.alpha as float32 (lora_alpha, times sqrt(r) for rsLoRA);
- tensor names from gguf's own tensor mapping (get_tensor_name_map) + ".lora_a"/".lora_b";
- values: lora_A and lora_B, lora_B's rows permuted for Llama's q/k (convert_hf_to_gguf.py's
  LlamaModel.permute), the embedding's A transposed (convert_lora_to_gguf.py), F32 exactly
  or F16 as numpy rounds them; shapes in ggml's order (reversed);
- llama.cpp's loader's shape rules (src/llama-adapter.cpp) against the base model's weights
  in the layout llama.cpp's converter gives them (GPT-2's Conv1D weights transposed);
- the update llama.cpp computes from each pair (alpha / rank · B·A) against what merging the
  adapter with the real HF peft (transformers + PeftModel) changes in the weight.

    check_gguf.py GGUF ADAPTER_DIR BASE_DIR f32|f16 [GGUF ADAPTER_DIR BASE_DIR f32|f16 ...]

Exit status 1 on any mismatch.
"""
import json
import math
import sys
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
         "gpt2": gguf.MODEL_ARCH.GPT2, "bert": gguf.MODEL_ARCH.BERT, "roberta": gguf.MODEL_ARCH.BERT}
FACTORS = ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_embedding_A", "A"), (".lora_embedding_B", "B"))


def permute(w, n_head, n_head_kv):
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_layout(w, module, config):
    """A weight of `module` (HF's layout) as llama.cpp's converter writes it: GPT-2's Conv1D
    weights transposed (GPT2Model), Llama's q/k rows permuted (LlamaModel)."""
    model_type = config["model_type"]
    if model_type == "gpt2" and module.endswith(("c_attn", "c_proj", "c_fc")):
        return w.T
    if ARCHS[model_type] == gguf.MODEL_ARCH.LLAMA and module.endswith("q_proj"):
        return permute(w, config["num_attention_heads"], config["num_attention_heads"])
    if ARCHS[model_type] == gguf.MODEL_ARCH.LLAMA and module.endswith("k_proj"):
        return permute(w, config["num_attention_heads"], config.get("num_key_value_heads"))
    return w


def hf_peft_updates(adapter_dir, base_dir):
    """What merging the adapter with the real HF peft changes in each base weight, by module."""
    import peft
    import torch
    import transformers
    config = json.loads((base_dir / "config.json").read_text())
    auto = (transformers.AutoModelForSequenceClassification
            if any(a.endswith("ForSequenceClassification") for a in config.get("architectures", []))
            else transformers.AutoModel if ARCHS[config["model_type"]] == gguf.MODEL_ARCH.BERT
            else transformers.AutoModelForCausalLM)
    model = auto.from_pretrained(base_dir, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = peft.PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return {k.removesuffix(".weight"): (v - before[k]).double().numpy()
            for k, v in merged.state_dict().items() if k in before and not torch.equal(v, before[k])}


def expected(adapter_dir, base_dir, outtype):
    config = json.loads((base_dir / "config.json").read_text())
    lora = json.loads((adapter_dir / "adapter_config.json").read_text())
    model_type = config["model_type"]
    arch = ARCHS[model_type]
    n_layers = config.get("num_hidden_layers", config.get("n_layer"))
    mapping = gguf.get_tensor_name_map(arch, n_layers)
    weights = load_file(base_dir / "model.safetensors")
    pairs = {}
    for key, t in load_file(adapter_dir / "adapter_model.safetensors").items():
        name = key.removeprefix("base_model.model.")
        for suffix, part in FACTORS:
            if name.endswith(suffix):
                pairs.setdefault(name[: -len(suffix)], {})[part] = t.astype(np.float32)
    tensors, base_ne, modules = {}, {}, {}
    for module, p in pairs.items():
        # llama.cpp's BertModel / RobertaModel drop the body's name (filter_tensors)
        name = mapping.get_name(module.removeprefix("bert.").removeprefix("roberta.") + ".weight", try_suffixes=(".weight",))
        a, b = p["A"], p["B"]
        if name == "token_embd.weight":
            a = a.T
        if arch == gguf.MODEL_ARCH.LLAMA and module.endswith(("q_proj", "k_proj")):
            b = llama_cpp_layout(b, module, config)  # the weight's rows permuted: B's rows
        a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
        key = module + ".weight" if module + ".weight" in weights else module.split(".", 1)[1] + ".weight"
        base_ne[name] = llama_cpp_layout(weights[key], module, config).shape[::-1]  # ggml's ne: the numpy shape reversed
        modules[name] = module
        dtype = np.float16 if outtype == "f16" else np.float32
        tensors[name + ".lora_a"], tensors[name + ".lora_b"] = a.astype(dtype), b.astype(dtype)
    alpha = lora["lora_alpha"] * (math.sqrt(lora["r"]) if lora.get("use_rslora") else 1.0)
    return gguf.MODEL_ARCH_NAMES[arch], tensors, alpha, base_ne, modules, config


def loader_accepts(name, w_ne, a_ne, b_ne):
    """src/llama-adapter.cpp's shape checks of a lora_a / lora_b pair against the model's tensor (ggml ne)."""
    if name == "token_embd.weight":  # "expect B to be non-transposed, A and B are flipped"
        return w_ne[0] == b_ne[1] and w_ne[1] == a_ne[1]
    return w_ne[0] == a_ne[0] and w_ne[1] == b_ne[1] and a_ne[1] == b_ne[0]


def ne(tensor):
    """A ReaderTensor's shape: ggml's ne, fastest dimension first."""
    return [int(n) for n in tensor.shape]


def check(path, adapter_dir, base_dir, outtype):
    errors = []
    arch, tensors, alpha, base_ne, modules, config = expected(adapter_dir, base_dir, outtype)
    reader = gguf.GGUFReader(path)
    fields = {name: (f.types[0], f.contents()) for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    S, F32 = gguf.GGUFValueType.STRING, gguf.GGUFValueType.FLOAT32
    for key, want in (("general.architecture", (S, arch)), ("general.type", (S, "adapter")), ("adapter.type", (S, "lora"))):
        if fields.get(key) != want:
            errors.append(f"{key} is {fields.get(key)}, expected {want}")
    got_alpha = fields.get("adapter.lora.alpha")
    if got_alpha is None or got_alpha[0] != F32 or not math.isclose(got_alpha[1], alpha, rel_tol=1e-6):
        errors.append(f"adapter.lora.alpha is {got_alpha}, expected float32 {alpha}")
    got = {t.name: t for t in reader.tensors}
    if set(got) != set(tensors):
        errors.append(f"tensors {sorted(got)} differ from {sorted(tensors)}")
    want_type = gguf.GGMLQuantizationType.F16 if outtype == "f16" else gguf.GGMLQuantizationType.F32
    for name in sorted(set(got) & set(tensors)):
        t, e = got[name], tensors[name]
        if t.tensor_type != want_type:
            errors.append(f"{name}: type {t.tensor_type.name}, expected {want_type.name}")
        if ne(t) != list(e.shape[::-1]):
            errors.append(f"{name}: ggml shape {ne(t)}, expected {list(e.shape[::-1])}")
        elif not np.array_equal(np.asarray(t.data).reshape(e.shape), e):
            errors.append(f"{name}: values differ (largest difference {np.abs(np.asarray(t.data).reshape(e.shape) - e).max()})")
    for name, w_ne in base_ne.items():
        a, b = got.get(name + ".lora_a"), got.get(name + ".lora_b")
        if a is not None and b is not None and not loader_accepts(name, w_ne, ne(a), ne(b)):
            errors.append(f"{name}: llama.cpp's loader refuses lora_a {ne(a)} / lora_b {ne(b)} for the model's {list(w_ne)}")
    # llama.cpp's update (llama-adapter.h get_scale: alpha / rank, rank = lora_b's ne[0]; build_lora_mm: B·A;
    # llm_build_inp_embd: row t = b·a[t]) equals HF peft's merged change in llama.cpp's layout of the weight
    updates = hf_peft_updates(adapter_dir, base_dir)
    tolerance = 3e-3 if outtype == "f16" else 1e-5
    for name, module in modules.items():
        a, b = (np.asarray(got[name + s].data, dtype=np.float64) for s in (".lora_a", ".lora_b"))
        scale = got_alpha[1] / b.shape[1]
        update = scale * (a @ b.T if name == "token_embd.weight" else b @ a)
        want = llama_cpp_layout(updates.get(module, np.zeros_like(update)), module, config)
        if want.shape != update.shape or np.abs(update - want).max() > tolerance * np.abs(want).max():
            errors.append(f"{name}: llama.cpp's update differs from HF peft's merged change of {module}")
    for e in errors:
        print(f"FAILED {path}: {e}", file=sys.stderr)
    if not errors:
        print(f"ok {path}: {arch}, {len(got)} tensors, alpha {got_alpha[1]}, {outtype}")
    return not errors


def main():
    args = sys.argv[1:]
    if not args or len(args) % 4:
        sys.exit(__doc__)
    results = [check(Path(args[i]), Path(args[i + 1]), Path(args[i + 2]), args[i + 3]) for i in range(0, len(args), 4)]
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
