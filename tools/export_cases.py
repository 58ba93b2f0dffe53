#!/usr/bin/python3
"""Small models shaped like the real-world reports of issue 17, for the C++ tests
and for the comparisons with the real HF peft (tools/reference/hf_cases.py).

    /usr/bin/python3 tools/export_cases.py --out build/fixtures

writes <case>_scripted.pt for each model below (Debian's torch 1.13, the version
LibTorch loads). The reference venv's torch 2.x builds the same eager classes and
loads these files' weights (load_case), so both sides compute on the same numbers.
  mlp        embed -> fc1 Linear(16, 36) -> gelu -> fc2 Linear(36, 7) -> head, at the root
  moe        layers.L.mlp.{gate Linear(16, 2) router, experts.E.{w1, w2}}, L, E in {0, 1}, at the root
  moe_model  the same under `model.` (as HF checkpoints name it)
  bert_cls   the BERT fixture as `bert` plus a `classifier` head (sequence classification)
  gpt2_tied  the GPT-2 fixture with lm_head.weight tied to transformer.wte.weight
  tied_lm    wte -> fc Linear(16, 16) -> lm_head tied to wte (nn.Linear only: HF peft adapts it)
"""
import argparse
import os

import torch
from torch import nn, Tensor
import torch.nn.functional as F

import export_fixtures as fx

VOCAB, DIM = 50, 16


class Mlp(nn.Module):
    """forward(input_ids [B, T] long) -> [B, T, 3]."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.fc1 = nn.Linear(DIM, 36)
        self.fc2 = nn.Linear(36, 7)
        self.head = nn.Linear(7, 3)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.head(self.fc2(F.gelu(self.fc1(self.embed(input_ids)))))


class Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Linear(DIM, 24, bias=False)
        self.w2 = nn.Linear(24, DIM, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)))


class MoeMlp(nn.Module):
    """A dense mixture: softmax(gate(x)) weighs both experts (an MoE router's shape)."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(DIM, 2, bias=False)
        self.experts = nn.ModuleList([Expert() for _ in range(2)])

    def forward(self, x: Tensor) -> Tensor:
        weights = torch.softmax(self.gate(x), dim=-1)
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            out = out + weights[..., i:i + 1] * expert(x)
        return out


class MoeLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = MoeMlp()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(x)


class Moe(nn.Module):
    """forward(input_ids [B, T] long) -> [B, T, VOCAB]."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList([MoeLayer() for _ in range(2)])
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


class MoeUnderModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = Moe()

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids)


class BertClassifier(nn.Module):
    """forward(input_ids, attention_mask) -> logits [B, 2] from the first token."""

    def __init__(self):
        super().__init__()
        self.bert = fx.BertModel()
        self.classifier = nn.Linear(fx.HIDDEN, 2)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.classifier(self.bert(input_ids, attention_mask)[:, 0])


class TiedLm(nn.Module):
    """forward(input_ids [B, T] long) -> [B, T, VOCAB], lm_head.weight is wte.weight."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, DIM)
        self.fc = nn.Linear(DIM, DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.lm_head(torch.tanh(self.fc(self.wte(input_ids))))


def gpt2_tied():
    model = fx.GPT2LMHeadModel()
    model.lm_head.weight = model.transformer.wte.weight
    return model


CASES = {"mlp": (Mlp, 11), "moe": (Moe, 12), "moe_model": (MoeUnderModel, 12), "bert_cls": (BertClassifier, 13),
         "gpt2_tied": (gpt2_tied, 14), "tied_lm": (TiedLm, 15)}


def inputs(case):
    """The inputs every side runs the case on."""
    g = torch.Generator().manual_seed(5)
    vocab = fx.VOCAB if case in ("bert_cls", "gpt2_tied") else VOCAB
    ids = torch.randint(vocab, (2, 6), generator=g)
    if case != "bert_cls":
        return [ids]
    return [ids, torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])]


def build(case):
    make, seed = CASES[case]
    torch.manual_seed(seed)
    return make().eval()


def load_case(case, fixture_dir):
    """The eager model with the weights of the exported file (any torch version)."""
    model = build(case)
    state = torch.jit.load(os.path.join(fixture_dir, f"{case}_scripted.pt")).state_dict()
    model.load_state_dict(state)
    if case == "gpt2_tied":
        model.lm_head.weight = model.transformer.wte.weight
    if case == "tied_lm":
        model.lm_head.weight = model.wte.weight
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)
    for case in CASES:
        torch.jit.script(build(case)).save(os.path.join(args.out, f"{case}_scripted.pt"))
    print(f"exported {', '.join(CASES)} to {args.out}")


if __name__ == "__main__":
    main()
