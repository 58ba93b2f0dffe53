#!/usr/bin/env python3
"""HF checkpoint folders against the real transformers (the reference venv: scripts/reference_env.sh).

    check_hf_models.py DIR [DIR ...]

Loads each folder with transformers' AutoModelForCausalLM (eager attention, the
folder's dtype; an F16 folder in fp32, as CPUs lack fp16 matmuls), with HF peft's
PeftModel.from_pretrained(DIR/adapter) on top when that folder exists, runs the
inputs of DIR/expected.safetensors, and compares the logits at the positions the
attention mask keeps (HF leaves the padded ones undefined): 1e-5 for fp32,
bf16's precision (2e-2 relative) for bf16. Exit status 1 on a mismatch, 3 when
transformers is missing.
"""
import json
import os
import sys

import torch

try:
    import transformers
    from safetensors.torch import load_file
except ImportError:
    print("transformers is not installed")
    sys.exit(3)


def check(folder):
    expected = load_file(os.path.join(folder, "expected.safetensors"))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float32}[
        json.load(open(os.path.join(folder, "config.json"))).get("torch_dtype", "float32")]
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=dtype, attn_implementation="eager")
    adapter = os.path.join(folder, "adapter")
    if os.path.isdir(adapter):  # an adapter trained in C++: HF peft applies it
        import peft
        model = peft.PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"]).logits
    keep = expected["attention_mask"].bool()
    got, want = logits[keep].float(), expected["logits"][keep].float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2 * want.abs().max().item()
    diff = (got - want).abs().max().item()
    ok = diff <= tol
    print(f"{'ok  ' if ok else 'FAIL'} {os.path.basename(folder)}: transformers {transformers.__version__} "
          f"max |diff| {diff:.3g} (tolerance {tol:.3g})")
    return ok


def main():
    results = [check(folder) for folder in sys.argv[1:]]
    sys.exit(0 if results and all(results) else 1)


if __name__ == "__main__":
    main()
