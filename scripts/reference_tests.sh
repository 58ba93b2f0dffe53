#!/usr/bin/env bash
# CI's reference stage: the tests that compare with the real HF libraries (peft,
# transformers, safetensors, tokenizers, gguf, bitsandbytes from PyPI, in the
# reference venv of scripts/reference_env.sh), over the build of scripts/test.sh.
# They run here and must not skip (PEFT_REQUIRE_REFERENCES=1 turns a skip into a failure).
#   BUILD_DIR (default: build)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
start=$SECONDS
PEFT_REF_PYTHON=$(bash scripts/reference_env.sh | tail -n 1)
export PEFT_REF_PYTHON PEFT_REQUIRE_REFERENCES=1
echo "reference: venv ready in $((SECONDS - start)) s ($PEFT_REF_PYTHON)"
"$PEFT_REF_PYTHON" -c 'import torch, peft, transformers; print("reference: torch", torch.__version__, "| peft", peft.__version__, "| transformers", transformers.__version__)'
# Every test whose suite starts with Real compares with the reference venv.
ctest --test-dir "$BUILD_DIR" -R '^Real' --no-tests=error --output-on-failure
# HF's JavaScript tokenizers (@huggingface/tokenizers, pinned in fetch_assets.sh) on the same files and corpus:
# informational (Rust is the reference; the known JS differences are printed), fails only if JS cannot load a real file.
node tools/tokenizer_reference.mjs
echo "reference: stage took $((SECONDS - start)) s"
