#!/usr/bin/env python3
"""Adapter files against the real HF peft (the reference venv: scripts/reference_env.sh).

    check_real_peft.py verify DIR   # peft.PeftModel.from_pretrained loads each DIR/<arch>_<method>
                                    # that C++ wrote into the eager fixture; outputs must equal DIR/*/io.pt
    check_real_peft.py write DIR    # HF peft's get_peft_model + save_pretrained on the eager fixtures,
                                    # with the outputs C++ must reproduce

Only LoRA, DoRA, IA3 and VeRA on nn.Linear layers (the LLaMA and BERT fixtures) are compared: HF peft
handles custom modules through their nn.Linear children, while its prompt learning needs a
transformers model and its Conv1D support transformers' own class. Exit status 1 on a mismatch,
3 when peft is missing.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import check_hf_format as hf  # noqa: E402  (fixture(), the eager models with the exported weights)

try:
    import peft
    from safetensors.torch import save_file
except ImportError:
    print("peft is not installed")
    sys.exit(3)

COMPARED = {("llama", "LORA"), ("bert", "LORA"), ("llama", "IA3"), ("bert", "IA3"), ("llama", "VERA"), ("bert", "VERA")}


def inputs_of(io):
    return [getattr(io, f"input_{i}") for i in range(2) if hasattr(io, f"input_{i}")]


def verify(case_dir):
    arch = os.path.basename(case_dir).split("_")[0]
    config = json.load(open(os.path.join(case_dir, "adapter_config.json")))
    if (arch, config["peft_type"]) not in COMPARED:
        print(f"skip {os.path.basename(case_dir)} (not comparable with HF peft on this fixture)")
        return True
    model = peft.PeftModel.from_pretrained(hf.fixture(arch), case_dir).eval()
    io = torch.jit.load(os.path.join(case_dir, "io.pt"))
    with torch.no_grad():
        out = model(*inputs_of(io))
    diff = (out - io.expected).abs().max().item()
    print(f"{'ok  ' if diff <= 1e-5 else 'FAIL'} {os.path.basename(case_dir)}: HF peft {peft.__version__} "
          f"max |diff| {diff:.3g}")
    return diff <= 1e-5


def write(root):
    cases = {
        "llama_lora": ("llama", peft.LoraConfig(r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False)),
        "llama_dora": ("llama", peft.LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False)),
        "bert_ia3": ("bert", peft.IA3Config(target_modules=["key", "value", "intermediate.dense"],
                                            feedforward_modules=["intermediate.dense"])),
    }
    torch.manual_seed(7)
    for name, (arch, config) in cases.items():
        model = peft.get_peft_model(hf.fixture(arch), config).eval()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "ia3_l" in n:
                    p.add_(0.1 * torch.randn_like(p))
                elif "lora_magnitude_vector" in n:
                    p.mul_(1 + 0.1 * torch.randn_like(p))
        case = os.path.join(root, name)
        model.save_pretrained(case)
        refs = torch.jit.load(os.path.join(os.environ["PEFT_FIXTURE_DIR"], f"{arch}_ref.pt"))
        inputs = [refs.input_ids] + ([refs.attention_mask] if arch == "bert" else [])
        with torch.no_grad():
            expected = model(*inputs)
        # safetensors: TorchScript files of torch 2.x do not load in LibTorch 1.13.
        save_file({**{f"input_{i}": x.contiguous() for i, x in enumerate(inputs)}, "expected": expected.contiguous()},
                  os.path.join(case, "io.safetensors"))
        print(f"wrote {case} with HF peft {peft.__version__}")


if __name__ == "__main__":
    sys.exit(hf.main(verify=verify, write=write))
