"""The real HF peft on the models of tools/export_cases.py: what the C++ tests of
issue 17 compare with (tests/test_reports.cpp, suite RealHfPeft).

    $PEFT_REF_PYTHON tools/reference/hf_cases.py DIR      (PEFT_FIXTURE_DIR names the exported models)

For each case it writes DIR/<case>/: the adapter as HF peft saves it, and
io.safetensors with the inputs (input_0, ...), HF's output with the adapter
(expected) and after merge_and_unload (expected_merged); the layer-index case
writes targets.json, the module names HF peft adapts. Run with the reference
venv's Python (transformers, peft, safetensors from PyPI).
"""
import json
import os
import sys

import peft
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import export_cases as cases  # noqa: E402


def randomise(model, scale=0.2, seed=3):
    """Non-trivial adapter values, as training would leave them."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))


def write_case(out, name, case, config, wrap=None):
    """HF's get_peft_model + save_pretrained on `case`, with the outputs C++ must reproduce."""
    base = cases.load_case(case, os.environ["PEFT_FIXTURE_DIR"])
    model = peft.get_peft_model(base, config) if wrap is None else wrap(base, config)
    randomise(model)
    model.eval()
    inputs = cases.inputs(case)
    folder = os.path.join(out, name)
    model.save_pretrained(folder)
    inner = model.base_model.model  # the model with HF's wrappers: forward takes our positional inputs
    with torch.no_grad():
        expected = inner(*inputs)
        merged = model.merge_and_unload()(*inputs)
    tensors = {f"input_{i}": x.contiguous() for i, x in enumerate(inputs)}
    tensors.update(expected=expected.contiguous(), expected_merged=merged.contiguous())
    save_file(tensors, os.path.join(folder, "io.safetensors"))
    print(f"wrote {folder} with HF peft {peft.__version__}: {json.load(open(os.path.join(folder, 'adapter_config.json')))['modules_to_save']}")


def seq_cls(base, config):
    """PeftModelForSequenceClassification, as task_type SEQ_CLS makes it: it adds
    modules_to_save ['classifier', 'score'] to the saved config."""
    return peft.PeftModelForSequenceClassification(base, config)


def two_dora(out):
    """Two DoRA adapters on the same layers of the LLaMA fixture (the issue's report),
    with HF's output of each alone: C++ must reproduce each and refuse both at once."""
    base = cases.fx.ARCHS["llama"]().eval()
    base.load_state_dict(torch.jit.load(os.path.join(os.environ["PEFT_FIXTURE_DIR"], "llama_scripted.pt")).state_dict())
    config = peft.LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj", "v_proj"])
    model = peft.get_peft_model(base, config)
    model.add_adapter("b", config)
    inputs = [cases.fx.reference_inputs("llama")["input_ids"]]
    tensors = {"input_0": inputs[0]}
    for seed, name in enumerate(["default", "b"]):
        model.set_adapter(name)
        randomise(model, seed=seed + 7)
    model.eval()
    for name in ["default", "b"]:
        model.set_adapter(name)
        with torch.no_grad():
            tensors[f"expected_{name}"] = model.base_model.model(*inputs).contiguous()
    folder = os.path.join(out, "two_dora")
    model.save_pretrained(folder)
    save_file(tensors, os.path.join(folder, "io.safetensors"))
    print(f"wrote {folder}: adapters default and b")


def targets(out):
    """The modules HF peft adapts for layers_to_transform on MoE names."""
    result = {}
    for key, config in {
        "w1_layer1": peft.LoraConfig(r=2, target_modules=["w1"], layers_to_transform=[1]),
        "w1_layer1_pattern": peft.LoraConfig(r=2, target_modules=["w1"], layers_to_transform=[1],
                                             layers_pattern="layers"),
        "w2_layer0": peft.LoraConfig(r=2, target_modules=["w2", "gate"], layers_to_transform=[0]),
    }.items():
        model = peft.get_peft_model(cases.load_case("moe_model", os.environ["PEFT_FIXTURE_DIR"]), config)
        result[key] = sorted(model.targeted_module_names)
    os.makedirs(os.path.join(out, "layer_index"), exist_ok=True)
    json.dump(result, open(os.path.join(out, "layer_index", "targets.json"), "w"), indent=1)
    print(f"wrote layer_index: {result}")


def main():
    out = sys.argv[1]
    torch.set_num_threads(1)
    lora = peft.LoraConfig
    write_case(out, "seq_cls", "bert_cls", lora(r=4, lora_alpha=8, target_modules=["query", "value"],
                                               task_type="SEQ_CLS"), wrap=seq_cls)
    write_case(out, "router_r4", "moe", lora(r=4, lora_alpha=8, target_modules=["gate", "w1"]))
    write_case(out, "tied_wte", "tied_lm", lora(r=2, target_modules=["fc"], modules_to_save=["wte"]))
    targets(out)
    two_dora(out)


if __name__ == "__main__":
    main()
