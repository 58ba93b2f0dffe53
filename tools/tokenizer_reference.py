#!/usr/bin/env python3
"""Reference ids for include/peft/hf/tokenizer.h, from the real HF `tokenizers`
(Rust) and `transformers` of the reference venv (scripts/reference_env.sh).

    tokenizer_reference.py [--assets DIR]            writes tests/data/tokenizer_expected.json
    tokenizer_reference.py --check CPP.json          compares the C++ output with HF, live
    tokenizer_reference.py --bench N                 HF's encode speed on the corpus x N

The variants are the pinned tokenizer.json files of scripts/fetch_assets.sh as
they are, and the same files with a patch (dotted JSON path -> new value) that
switches on the components those files do not use (Metaspace, WordPiece decoder
cleanup off, Split behaviours, normalizers, added-token flags, ...). The patches
are written into the expected file, so the C++ test builds the same tokenizers.

For every variant and every string of tests/data/tokenizer_corpus.json the file
holds encode(text, add_special_tokens=True).ids and the decode of those ids
(skip_special_tokens=False); `decoded` is null where it equals the text. The
`auto` section holds transformers' AutoTokenizer ids and batches for each folder.
"""
import argparse
import copy
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "data" / "tokenizer_corpus.json"
EXPECTED = ROOT / "tests" / "data" / "tokenizer_expected.json"

LLAMA3 = "llama3-tokenizer/models/tokenizer.json"
QWEN3 = "qwen3-tokenizer/models/tokenizer.json"
LLAMA2 = "llama2-tokenizer/models/tokenizer.json"
BERT = "all-minilm-l6-v2/tokenizer.json"
FOLDERS = ["llama3-tokenizer/models", "qwen3-tokenizer/models", "llama2-tokenizer/models", "all-minilm-l6-v2"]

META = "\u2581"


def special(token, type_id=0):
    return {"SpecialToken": {"id": token, "type_id": type_id}}


def seq(name, type_id=0):
    return {"Sequence": {"id": name, "type_id": type_id}}


def template(bos, bos_id, eos=None, eos_id=None):
    single = [special(bos), seq("A")] + ([special(eos)] if eos else [])
    pair = single + [special(bos, 1), seq("B", 1)] + ([special(eos, 1)] if eos else [])
    tokens = {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}
    if eos:
        tokens[eos] = {"id": eos, "ids": [eos_id], "tokens": [eos]}
    return {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": tokens}


def added(id_, content, special=False, single_word=False, lstrip=False, rstrip=False, normalized=None):
    return {"id": id_, "content": content, "single_word": single_word, "lstrip": lstrip, "rstrip": rstrip,
            "normalized": (not special) if normalized is None else normalized, "special": special}


def split(pattern, behavior, invert=False, regex=True):
    return {"type": "Split", "pattern": {"Regex" if regex else "String": pattern}, "behavior": behavior, "invert": invert}


BYTE_LEVEL_NO_REGEX = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
NO_PAD = {"truncation": None, "padding": None}

# (name, file under assets/, patch: dotted path -> value; "+added_tokens" appends to the list)
VARIANTS = [
    ("llama3", LLAMA3, {}),
    ("qwen3", QWEN3, {}),
    ("llama2", LLAMA2, {}),
    ("bert", BERT, {}),
    # Llama 2 as transformers' LlamaTokenizer (legacy=False) and Mistral files build it: Metaspace, prepend first
    ("llama2-metaspace-first", LLAMA2, {
        "normalizer": None,
        "pre_tokenizer": {"type": "Metaspace", "replacement": META, "prepend_scheme": "first", "split": False}}),
    # Metaspace splitting, the Metaspace decoder, BPE without byte fallback (fused <unk>)
    ("llama2-metaspace-always-split", LLAMA2, {
        "normalizer": None,
        "model.byte_fallback": False,
        "pre_tokenizer": {"type": "Metaspace", "replacement": META, "prepend_scheme": "always", "split": True},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "ByteFallback"},
            {"type": "Metaspace", "replacement": META, "prepend_scheme": "always", "split": True}]}}),
    ("llama2-metaspace-never", LLAMA2, {
        "normalizer": {"type": "NFKC"},
        "pre_tokenizer": {"type": "Metaspace", "replacement": META, "add_prefix_space": False,
                          "prepend_scheme": "never", "split": True},
        "post_processor": template("<s>", 1, "</s>", 2),
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Metaspace", "replacement": META, "prepend_scheme": "never", "split": True}]}}),
    # GPT-2's pre-tokenizer (ByteLevel with its own regex) over Llama 3's vocabulary, Llama 3.1's post-processor
    ("gpt2-bytelevel", LLAMA3, {
        "model.ignore_merges": False,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": {"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
            template("<|begin_of_text|>", 128000)]}}),
    # add_prefix_space, RobertaProcessing, truncation from the left and padding in the file
    ("gpt2-prefix-roberta", LLAMA3, {
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "post_processor": {"type": "RobertaProcessing", "sep": ["<|end_of_text|>", 128001],
                           "cls": ["<|begin_of_text|>", 128000], "trim_offsets": True, "add_prefix_space": True},
        "truncation": {"direction": "Left", "max_length": 24, "strategy": "LongestFirst", "stride": 0},
        "padding": {"strategy": "BatchLongest", "direction": "Left", "pad_to_multiple_of": 8, "pad_id": 128002,
                    "pad_type_id": 0, "pad_token": "<|reserved_special_token_0|>"}}),
    # cased BertNormalizer with accents stripped, WhitespaceSplit/Punctuation/Digits, BertProcessing, added tokens
    ("bert-cased", BERT, dict(NO_PAD, **{
        "normalizer": {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": False,
                       "strip_accents": True, "lowercase": False},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "WhitespaceSplit"}, {"type": "Punctuation", "behavior": "Isolated"},
            {"type": "Digits", "individual_digits": True}]},
        "post_processor": {"type": "BertProcessing", "sep": ["[SEP]", 102], "cls": ["[CLS]", 101]},
        "+added_tokens": [added(30522, "Hello World"), added(30523, "word", single_word=True),
                          added(30524, "<tag>", special=True, lstrip=True, rstrip=True),
                          added(30525, "[mask]", lstrip=True, normalized=True)]})),
    ("bert-nfkd-whitespace", BERT, dict(NO_PAD, **{
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFKD"}, {"type": "StripAccents"}, {"type": "Lowercase"},
            {"type": "Replace", "pattern": {"Regex": "\\d{3,}"}, "content": "#"},
            {"type": "Replace", "pattern": {"String": "--"}, "content": " \u2014 "}]},
        "pre_tokenizer": {"type": "Whitespace"},
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": False}})),
    ("bert-nfkc-splits", BERT, dict(NO_PAD, **{
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "NFKC"}, {"type": "Lowercase"}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            split("\\s+", "Removed"), {"type": "Punctuation", "behavior": "MergedWithPrevious"},
            {"type": "Digits", "individual_digits": False}]},
        "post_processor": {"type": "Sequence", "processors": [
            {"type": "BertProcessing", "sep": ["[SEP]", 102], "cls": ["[CLS]", 101]}]}})),
    # WordLevel, the Strip normalizer, CharDelimiterSplit, Punctuation removing, the BPEDecoder
    ("bert-wordlevel", BERT, dict(NO_PAD, **{
        "model.type": "WordLevel", "model.unk_token": "[UNK]",
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Strip", "strip_left": True, "strip_right": True}, {"type": "Lowercase"}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "CharDelimiterSplit", "delimiter": " "}, {"type": "Punctuation", "behavior": "Removed"}]},
        "decoder": {"type": "BPEDecoder", "suffix": "ing"}})),
    # every Split behaviour, on Qwen 3's byte-level vocabulary
    ("qwen3-splits", QWEN3, {
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "NFD"}, {"type": "StripAccents"}, {"type": "NFC"}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            split("\\s+", "MergedWithNext"), split("--", "Removed", regex=False),
            split("\\p{P}+", "MergedWithPrevious"), split("\\p{N}", "Contiguous"),
            {"type": "Punctuation", "behavior": "MergedWithNext"}, BYTE_LEVEL_NO_REGEX]}}),
    # inverted Splits, Prepend, normalized added tokens and lstrip/rstrip/single_word
    ("qwen3-invert", QWEN3, {
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFKD"}, {"type": "Lowercase"}, {"type": "Prepend", "prepend": " "}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            split("\\w+|[^\\w\\s]+", "Removed", invert=True), split("[aeiou]", "MergedWithNext", invert=True),
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": False}]},
        "+added_tokens": [added(151669, "<tag>", special=True, lstrip=True, rstrip=True),
                          added(151670, "word", single_word=True), added(151671, "Caf\u00e9"),
                          added(151672, "[MASK]", special=True, lstrip=True)]}),
]


def load_corpus():
    return json.loads(CORPUS.read_text(encoding="utf-8"))


def apply_patch(j, patch):
    """The tokenizer.json `j` with `patch` applied (dotted paths; '+key' appends to a list)."""
    j = copy.deepcopy(j)
    for path, value in patch.items():
        if path.startswith("+"):
            j[path[1:]] = j[path[1:]] + copy.deepcopy(value)
            continue
        *parents, last = path.split(".")
        node = j
        for p in parents:
            node = node[p]
        node[last] = copy.deepcopy(value)
    return j


def build(assets, file, patch):
    from tokenizers import Tokenizer
    with open(os.path.join(assets, file), encoding="utf-8") as f:
        j = json.load(f)
    return Tokenizer.from_str(json.dumps(apply_patch(j, patch)))


def encode_decode(tok, text):
    ids = tok.encode(text, add_special_tokens=True).ids
    return ids, tok.decode(ids, skip_special_tokens=False)


def auto_section(assets, corpus):
    """transformers' AutoTokenizer on every folder: ids, special ids, and padded batches."""
    import warnings
    warnings.filterwarnings("ignore")
    from transformers import AutoTokenizer
    from transformers.utils import logging
    logging.set_verbosity_error()
    out = []
    for folder in FOLDERS:
        tok = AutoTokenizer.from_pretrained(os.path.join(assets, folder))
        entry = {"folder": folder, "class": type(tok).__name__, "padding_side": tok.padding_side,
                 "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
                 "eos_token_id": tok.eos_token_id, "vocab_size": len(tok),
                 "ids": [tok(t)["input_ids"] for t in corpus], "batches": []}
        if tok.pad_token_id is not None:
            texts = [corpus[0], corpus[2], corpus[25], corpus[17]]
            options = ({"padding": True}, {"padding": True, "truncation": True, "max_length": 12},
                       {"padding": "max_length", "truncation": True, "max_length": 48, "pad_to_multiple_of": 16},
                       {"padding": True, "pad_to_multiple_of": 8})
            for side in ("right", "left"):
                for kwargs in options:
                    b = tok(texts, padding_side=side, **kwargs)
                    entry["batches"].append({"texts": texts, "padding_side": side, "options": kwargs,
                                             "input_ids": b["input_ids"], "attention_mask": b["attention_mask"]})
        out.append(entry)
    return out


def write_expected(assets):
    import tokenizers
    import transformers
    corpus = load_corpus()
    variants = []
    for name, file, patch in VARIANTS:
        tok = build(assets, file, patch)
        results = []
        for text in corpus:
            ids, decoded = encode_decode(tok, text)
            results.append({"ids": ids, "decoded": None if decoded == text else decoded})
        variants.append({"name": name, "file": file, "patch": patch, "results": results})
    out = {"tokenizers": tokenizers.__version__, "transformers": transformers.__version__,
           "corpus": "tests/data/tokenizer_corpus.json", "variants": variants, "auto": auto_section(assets, corpus)}
    text = json.dumps(out, ensure_ascii=True, separators=(",", ":"))
    # one line per result keeps diffs readable
    text = text.replace('{"ids":', '\n{"ids":').replace('{"name":', '\n{"name":').replace('{"folder":', '\n{"folder":')
    EXPECTED.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {EXPECTED} ({EXPECTED.stat().st_size} bytes): {len(variants)} variants x {len(corpus)} strings")


def check(assets, cpp_file):
    """Compares the C++ output (the test's JSON: variant, text, ids, decoded) with HF, live."""
    with open(cpp_file, encoding="utf-8") as f:
        cases = json.load(f)["cases"]
    tokenizers = {name: build(assets, file, patch) for name, file, patch in VARIANTS}
    bad = 0
    for case in cases:
        tok = tokenizers[case["variant"]]
        ids, decoded = encode_decode(tok, case["text"])
        if ids != case["ids"] or decoded != case["decoded"]:
            bad += 1
            if bad <= 20:
                print(f"MISMATCH {case['variant']} {case['text']!r}\n  HF  {ids} {decoded!r}\n  C++ {case['ids']} {case['decoded']!r}")
    print(f"tokenizer_reference --check: {len(cases)} cases, {bad} mismatches with tokenizers "
          f"{__import__('tokenizers').__version__}")
    return 1 if bad else 0


def bench(assets, n):
    """Tokens/s of HF tokenizers' encode, one string at a time on one thread, over the corpus x n."""
    corpus = load_corpus() * n
    for name, file, patch in VARIANTS[:4]:
        tok = build(assets, file, patch)
        tok.no_padding()
        tok.no_truncation()
        start = time.perf_counter()
        count = sum(len(tok.encode(t).ids) for t in corpus)
        seconds = time.perf_counter() - start
        print(f"HF tokenizers {name}: {count} tokens in {seconds:.3f} s = {count / seconds:,.0f} tokens/s")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default=str(ROOT / "assets"))
    parser.add_argument("--check", metavar="CPP_JSON")
    parser.add_argument("--bench", type=int, metavar="N")
    a = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    if a.check:
        return check(a.assets, a.check)
    if a.bench:
        return bench(a.assets, a.bench)
    write_expected(a.assets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
