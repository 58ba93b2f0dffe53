#!/usr/bin/python3
"""HF peft's adapter file layout, checked and written with json + torch only.

    check_hf_format.py verify DIR    # files C++ wrote: HF's fields, types, keys, shapes;
                                     # then loads them the way HF peft does into the
                                     # eager fixture model and compares with DIR/expected.pt
    check_hf_format.py write DIR     # writes HF-layout adapters for the fixtures, as
                                     # HF peft would, plus the outputs they must give

DIR holds one sub-directory per case, named <arch>_<method> (e.g. gpt2_lora),
with adapter_config.json, adapter_model.safetensors and io.pt (a TorchScript
container with input_0.., expected). Exit status 1 on any mismatch.
"""
import json
import math
import os
import struct
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import export_fixtures as fx  # noqa: E402  (the fixture architectures)

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
SEEDS = {"gpt2": 1, "bert": 2, "llama": 3}
HF_COMMON = {"peft_type": str, "task_type": (type(None), str), "base_model_name_or_path": (type(None), str),
             "revision": (type(None), str), "inference_mode": bool}
HF_FIELDS = {
    "LORA": {"r": int, "lora_alpha": (int, float), "lora_dropout": (int, float), "target_modules": (list, str),
             "exclude_modules": (type(None), list, str), "layers_to_transform": (type(None), list, int),
             "layers_pattern": (type(None), list, str), "rank_pattern": dict, "alpha_pattern": dict,
             "use_rslora": bool, "use_dora": bool, "init_lora_weights": (bool, str), "fan_in_fan_out": bool,
             "bias": str, "modules_to_save": (type(None), list)},
    "IA3": {"target_modules": (list, str), "feedforward_modules": (type(None), list, str), "fan_in_fan_out": bool,
            "init_ia3_weights": bool, "modules_to_save": (type(None), list)},
    "VERA": {"r": int, "target_modules": (list, str), "projection_prng_key": int, "save_projection": bool,
             "vera_dropout": (int, float), "d_initial": (int, float), "fan_in_fan_out": bool, "bias": str,
             "modules_to_save": (type(None), list), "init_weights": bool,
             "layers_to_transform": (type(None), list, int), "layers_pattern": (type(None), list, str)},
    "PROMPT_TUNING": {"num_virtual_tokens": int, "token_dim": int, "num_transformer_submodules": int,
                      "prompt_tuning_init": str},
    "PREFIX_TUNING": {"num_virtual_tokens": int, "token_dim": int, "num_transformer_submodules": int,
                      "num_attention_heads": int, "num_layers": int, "encoder_hidden_size": int,
                      "prefix_projection": bool},
}


def read_safetensors(path):
    """A strict parser: the same checks as the reference implementation."""
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    assert n <= len(data) - 8, "header longer than the file"
    header = json.loads(data[8:8 + n])
    assert n % 8 == 0, "header not padded to 8 bytes"
    meta = header.pop("__metadata__", {})
    body = data[8 + n:]
    spans, tensors = [], {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        dtype = DTYPES[info["dtype"]]
        numel = math.prod(info["shape"])
        assert end - start == numel * torch.tensor([], dtype=dtype).element_size(), name
        tensors[name] = torch.frombuffer(bytearray(body[start:end]), dtype=dtype).reshape(info["shape"]).clone()
        spans.append((start, end))
    spans.sort()
    assert [s for s, _ in spans] == [0] + [e for _, e in spans[:-1]] and (not spans or spans[-1][1] == len(body))
    return tensors, meta


def write_safetensors(path, tensors):
    """As safetensors' writer: data by dtype size then name, header padded with spaces."""
    items = sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    names = {v: k for k, v in DTYPES.items()}
    for name, t in items:
        size = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((8 - len(blob) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for _, t in items:
            f.write(t.contiguous().numpy().tobytes())


def fixture(arch):
    """The eager model; with PEFT_FIXTURE_DIR, with the exported fixture's weights
    (the same numbers under any torch version, whose initialisers may differ)."""
    torch.manual_seed(SEEDS[arch])
    model = fx.ARCHS[arch]().eval()
    exported = os.path.join(os.environ.get("PEFT_FIXTURE_DIR", ""), f"{arch}_scripted.pt")
    if os.environ.get("PEFT_FIXTURE_DIR") and os.path.exists(exported):
        model.load_state_dict(torch.jit.load(exported).state_dict())
    return model


def module_at(model, path):
    for part in path.split("."):
        model = getattr(model, part)
    return model


ADAPTER_KEYS = (".lora_", ".ia3_l", ".vera_lambda_", "base_model.vera_")


def with_trained_tensors(model, tensors):
    """The file's other tensors (modules_to_save, trained biases) put into the model; its forward."""
    for key, value in tensors.items():
        if any(part in key for part in ADAPTER_KEYS):
            continue
        path, name = key[len("base_model.model."):].rsplit(".", 1)
        getattr(module_at(model, path), name).data.copy_(value)
    return lambda *args: model(*args)


def apply_adapter(model, config, tensors):
    """Loads an HF-layout adapter into an eager model the way HF peft applies it."""
    kind = config["peft_type"]
    prefix = "base_model.model."
    if kind in ("LORA", "IA3"):
        paths = sorted({k[len(prefix):].rsplit(".", 2 if kind == "LORA" else 1)[0] for k in tensors
                        if ".lora_" in k or k.endswith(".ia3_l")})
        for path in paths:
            mod = module_at(model, path)
            if kind == "LORA":
                A, B = tensors[f"{prefix}{path}.lora_A.weight"], tensors[f"{prefix}{path}.lora_B.weight"]
                s = config["lora_alpha"] / (math.sqrt(config["r"]) if config["use_rslora"] else config["r"])
                mod.register_forward_hook(lambda m, inp, out, A=A, B=B, s=s: out + s * (inp[0] @ A.t() @ B.t()))
            else:
                l = tensors[f"{prefix}{path}.ia3_l"]
                if l.shape[0] == 1:  # feed-forward: scale the input
                    mod.register_forward_pre_hook(lambda m, inp, l=l: (inp[0] * l.flatten(),))
                else:
                    mod.register_forward_hook(lambda m, inp, out, l=l: out * l.flatten())
        return with_trained_tensors(model, tensors)
    if kind == "VERA":  # HF's vera.Linear: out + λ_b ⊙ linear(λ_d ⊙ linear(x, A[:, :in]), B[:out])
        A, B = tensors["base_model.vera_A"], tensors["base_model.vera_B"]
        for key in [k for k in tensors if k.endswith(".vera_lambda_b")]:
            path = key[len(prefix):].rsplit(".", 1)[0]
            lb, ld = tensors[key], tensors[f"{prefix}{path}.vera_lambda_d"]
            module_at(model, path).register_forward_hook(
                lambda m, inp, out, lb=lb, ld=ld: out + lb * torch.nn.functional.linear(
                    ld * torch.nn.functional.linear(inp[0], A[:, :inp[0].shape[-1]]), B[:lb.shape[0]]))
        return with_trained_tensors(model, tensors)
    if kind == "PROMPT_TUNING":
        prompt = tensors["prompt_embeddings"]
        return lambda *args: fx.prompt_reference(ARCH, model, dict(zip(INPUT_NAMES, args)), prompt)
    layers, heads = config["num_layers"], config["num_attention_heads"]
    p = tensors["prompt_embeddings"]  # HF: [P, layers*2*token_dim] -> view(P, layers*2, heads, d)
    prefix_t = p.view(p.shape[0], layers, 2, heads, config["token_dim"] // heads).permute(1, 2, 3, 0, 4)
    return lambda *args: fx.prefix_reference(ARCH, model, dict(zip(INPUT_NAMES, args)), prefix_t)


def check_config(config):
    kind = config.get("peft_type")
    errors = []
    for key, types in {**HF_COMMON, **HF_FIELDS.get(kind, {})}.items():
        if key not in config:
            errors.append(f"missing field {key}")
        elif not isinstance(config[key], types) or (types is int and isinstance(config[key], bool)):
            errors.append(f"field {key} has type {type(config[key]).__name__}")
    if kind == "LORA" and config.get("bias") not in ("none", "all", "lora_only"):
        errors.append("bias must be none/all/lora_only")
    return errors


def check_keys(config, tensors):
    kind, errors = config["peft_type"], []
    for key, t in tensors.items():
        if kind in ("PROMPT_TUNING", "PREFIX_TUNING"):
            ok = key == "prompt_embeddings" and t.dim() == 2
        elif key.endswith((".lora_A.weight", ".lora_B.weight")):
            r = config["r"]
            ok = key.startswith("base_model.model.") and t.dim() == 2 and (t.shape[0] if ".lora_A" in key else t.shape[1]) == r
        elif key.endswith(".ia3_l"):
            ok = t.dim() == 2 and 1 in t.shape
        elif key.endswith((".vera_lambda_b", ".vera_lambda_d")):
            ok = key.startswith("base_model.model.") and t.dim() == 1 and (key.endswith("_b") or t.shape[0] == config["r"])
        elif key in ("base_model.vera_A", "base_model.vera_B"):
            ok = t.dim() == 2 and t.shape[0 if key.endswith("A") else 1] == config["r"]
        else:
            ok = key.startswith("base_model.model.")
        if not ok:
            errors.append(f"tensor {key} {list(t.shape)} does not follow HF's layout")
    return errors


def run_case(case_dir):
    global ARCH, INPUT_NAMES
    ARCH = os.path.basename(case_dir).split("_")[0]
    INPUT_NAMES = ["input_ids", "attention_mask"] if ARCH == "bert" else ["input_ids"]
    config = json.load(open(os.path.join(case_dir, "adapter_config.json")))
    tensors, meta = read_safetensors(os.path.join(case_dir, "adapter_model.safetensors"))
    errors = check_config(config) + check_keys(config, tensors)
    if meta != {"format": "pt"}:
        errors.append(f"metadata {meta} != {{'format': 'pt'}}")
    io = torch.jit.load(os.path.join(case_dir, "io.pt"))
    inputs = [getattr(io, f"input_{i}") for i in range(2) if hasattr(io, f"input_{i}")]
    with torch.no_grad():
        out = apply_adapter(fixture(ARCH), config, tensors)(*inputs)
    diff = (out - io.expected).abs().max().item()
    if diff > 1e-5:
        errors.append(f"output differs from C++ by {diff}")
    print(f"{'ok  ' if not errors else 'FAIL'} {os.path.basename(case_dir)} {'; '.join(errors)}")
    return not errors


def ia3_shape(model, path):
    """HF's ia3_l: (1, in) for feed-forward modules, (out, 1) otherwise."""
    out_features, in_features = module_at(model, path).weight.shape
    return (1, in_features) if path.endswith("intermediate.dense") else (out_features, 1)


def write_cases(out):
    """HF-layout adapters as HF peft writes them, with the outputs they must give."""
    global ARCH, INPUT_NAMES
    torch.manual_seed(7)
    cases = {
        "gpt2_lora": ({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_fc"],
                       "fan_in_fan_out": True, "use_rslora": False},
                      lambda m: {f"{p}.{n}": w for p in [f"transformer.h.{i}.{t}" for i in range(2) for t in ("attn.c_attn", "mlp.c_fc")]
                                 for n, w in (("lora_A.weight", torch.randn(4, 64) * 0.1),
                                              ("lora_B.weight", torch.randn(module_at(m, p).weight.shape[1], 4) * 0.1))}),
        "llama_lora": ({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"],
                        "use_rslora": True, "fan_in_fan_out": False},
                       lambda m: {f"{p}.{n}": w for p in [f"model.layers.{i}.self_attn.{t}" for i in range(2) for t in ("q_proj", "v_proj")]
                                  for n, w in (("lora_A.weight", torch.randn(2, 64) * 0.1),
                                               ("lora_B.weight", torch.randn(module_at(m, p).weight.shape[0], 2) * 0.1))}),
        "bert_ia3": ({"peft_type": "IA3", "target_modules": ["key", "value", "intermediate.dense"],
                      "feedforward_modules": ["intermediate.dense"], "fan_in_fan_out": False},
                     lambda m: {f"{p}.ia3_l": 1 + 0.1 * torch.randn(*ia3_shape(m, p))
                                for p in [f"encoder.layer.{i}.{t}" for i in range(2)
                                          for t in ("attention.self.key", "attention.self.value", "intermediate.dense")]}),
    }
    for name, (config, make) in cases.items():
        ARCH = name.split("_")[0]
        INPUT_NAMES = ["input_ids", "attention_mask"] if ARCH == "bert" else ["input_ids"]
        model = fixture(ARCH)
        tensors = {f"base_model.model.{k}": v for k, v in make(model).items()}
        full = {"task_type": None, "base_model_name_or_path": None, "revision": None, "inference_mode": True,
                "lora_dropout": 0.0, "bias": "none", "modules_to_save": None, "init_lora_weights": True,
                "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
                "use_dora": False, "megatron_config": None, "loftq_config": {}, **config}
        case = os.path.join(out, name)
        os.makedirs(case, exist_ok=True)
        json.dump(full, open(os.path.join(case, "adapter_config.json"), "w"), indent=2)
        write_safetensors(os.path.join(case, "adapter_model.safetensors"), tensors)
        refs = torch.jit.load(os.path.join(os.environ["PEFT_FIXTURE_DIR"], f"{ARCH}_ref.pt"))
        inputs = [refs.input_ids] + ([refs.attention_mask] if ARCH == "bert" else [])
        with torch.no_grad():
            expected = apply_adapter(model, full, tensors)(*inputs)
        torch.jit.script(fx.References({**{f"input_{i}": x for i, x in enumerate(inputs)}, "expected": expected})).save(
            os.path.join(case, "io.pt"))
        print(f"wrote {case}")


def main(verify=None, write=None):
    """`verify DIR` checks every case folder of DIR, `write DIR` writes cases; exit status."""
    mode, root = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    if mode == "write":
        (write or write_cases)(root)
        return 0
    cases = sorted(d for d in (os.path.join(root, x) for x in os.listdir(root)) if os.path.isdir(d))
    if not cases:
        print(f"no cases in {root}")
        return 2
    return 0 if all([(verify or run_case)(c) for c in cases]) else 1


if __name__ == "__main__":
    sys.exit(main())
