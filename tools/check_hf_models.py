#!/usr/bin/env python3
"""HF checkpoint folders against the real transformers (the reference venv: scripts/reference_env.sh).

    check_hf_models.py DIR [DIR ...]
    check_hf_models.py --make-adapter DIR OUT TARGET [TARGET ...]

Loads each folder with transformers (eager attention, the folder's dtype; an
F16 folder in fp32, as CPUs lack fp16 matmuls): AutoModelForSequenceClassification
when config.json's architectures name a *ForSequenceClassification, AutoModel when
DIR/expected.safetensors holds a last_hidden_state, else AutoModelForCausalLM;
with HF peft's PeftModel.from_pretrained(DIR/adapter) on top when that folder
exists. It runs the inputs of DIR/expected.safetensors and compares the output
(classifier logits: every row; token outputs: at the positions the attention
mask keeps, as HF leaves the padded ones undefined): 1e-5 for fp32, bf16's
precision (2e-2 relative) for bf16. Exit status 1 on a mismatch, 3 when
transformers is missing.

--make-adapter: the other direction. HF peft puts a LoRA adapter (random A and B,
on TARGET modules; a classifier's head in modules_to_save, changed) on DIR's model
and writes it to OUT/adapter with OUT/expected.safetensors: DIR's inputs and the
adapted model's output, for the C++ side to load and compare.
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


def load(folder):
    """The folder's model as the Auto class of its task loads it, its output key, and whether it classifies."""
    config = json.load(open(os.path.join(folder, "config.json")))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float32}[config.get("torch_dtype", "float32")]
    expected = load_file(os.path.join(folder, "expected.safetensors"))
    classifier = any(a.endswith("ForSequenceClassification") for a in config.get("architectures", []))
    key = "last_hidden_state" if "last_hidden_state" in expected else "logits"
    auto = (transformers.AutoModelForSequenceClassification if classifier
            else transformers.AutoModel if key == "last_hidden_state" else transformers.AutoModelForCausalLM)
    return auto.from_pretrained(folder, dtype=dtype, attn_implementation="eager"), expected, key, classifier, dtype


def make_adapter(folder, out, targets):
    import peft
    model, expected, key, classifier, _ = load(folder)
    torch.manual_seed(0)
    head = [n for n in ("classifier", "score") if hasattr(model, n)]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                             modules_to_save=head or None)
    model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.5 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(os.path.join(out, "adapter"))
    with torch.no_grad():
        output = model(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"])[key]
    from safetensors.torch import save_file
    save_file({"input_ids": expected["input_ids"], "attention_mask": expected["attention_mask"], key: output.contiguous()},
              os.path.join(out, "expected.safetensors"))
    print(f"wrote an HF peft LoRA adapter on {targets}{' and ' + head[0] if head else ''} to {out}")


def compare_generation(folder, model):
    """DIR/generated.safetensors: prompts (left-padded), their mask and what C++ generated greedily (stopping at
    eos_token_id, then pad 0). transformers' generate must give the same tokens."""
    g = load_file(os.path.join(folder, "generated.safetensors"))
    new = g["output"].shape[1] - g["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(input_ids=g["input_ids"], attention_mask=g["attention_mask"], max_new_tokens=new,
                             do_sample=False, pad_token_id=0)
    out = torch.nn.functional.pad(out, (0, g["output"].shape[1] - out.shape[1]), value=0)  # all rows stopped early
    same = torch.equal(out, g["output"])
    print(f"{'ok  ' if same else 'FAIL'} {os.path.basename(folder)}: generate, {new} greedy tokens"
          + ("" if same else f"\n  transformers {out.tolist()}\n  C++          {g['output'].tolist()}"))
    return same


def check(folder):
    model, expected, key, classifier, dtype = load(folder)
    adapter = os.path.join(folder, "adapter")
    if os.path.isdir(adapter):  # an adapter trained in C++: HF peft applies it
        import peft
        model = peft.PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        output = model(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"])[key]
    if not classifier:  # prompt tuning: HF peft returns the virtual positions too, in front
        output = output[:, -expected["attention_mask"].shape[1]:]
    keep = torch.ones(output.shape[0], dtype=torch.bool) if classifier else expected["attention_mask"].bool()
    got, want = output[keep].float(), expected[key][keep].float()
    ok = compare_generation(folder, model) if os.path.exists(os.path.join(folder, "generated.safetensors")) else True
    tol = 1e-5 if dtype == torch.float32 else 2e-2 * want.abs().max().item()
    diff = (got - want).abs().max().item()
    ok = ok and diff <= tol
    print(f"{'ok  ' if ok else 'FAIL'} {os.path.basename(folder)}: transformers {transformers.__version__} "
          f"max |diff| {diff:.3g} (tolerance {tol:.3g})")
    return ok


def main():
    if sys.argv[1:2] == ["--make-adapter"]:
        make_adapter(sys.argv[2], sys.argv[3], sys.argv[4:])
        return
    results = [check(folder) for folder in sys.argv[1:]]
    sys.exit(0 if results and all(results) else 1)


if __name__ == "__main__":
    main()
