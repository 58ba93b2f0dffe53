#!/usr/bin/env bash
# Training memory and step time: C++ configurations (peft-bench-train on a random
# GPT-2-small HF folder, batch 4 x 128) and the Python peer (benchmarks/peer_gpt2.py,
# the same folder in plain PyTorch), one process each, alternated RUNS times; every
# figure is a median of ratios of runs taken side by side. Then, with LLAMA_1B=1, peak
# RSS of QLoRA, LoRA and full fine-tuning of a 1.2 B Llama shape at sequence 512.
# Writes $BUILD/benchmark-results/train_memory.md; with --update-docs also the
# section of docs/performance.md (THREADS=2, RUNS>=3, LLAMA_1B=1 only).
#   benchmarks/train_memory.sh [BUILD_DIR] [--update-docs]      THREADS (2)  RUNS (3)  LLAMA_1B (1)
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/common.sh
BUILD=${POSITIONAL[0]:-build}
THREADS=${THREADS:-2}
RUNS=${RUNS:-3}
LLAMA_1B=${LLAMA_1B:-1}
reasons=()
[ "$THREADS" = 2 ] || reasons+=("THREADS=$THREADS is not 2")
[ "$RUNS" -ge 3 ] || reasons+=("RUNS=$RUNS is under 3")
[ "$LLAMA_1B" = 1 ] || reasons+=("LLAMA_1B=$LLAMA_1B leaves out the 1B table")
refuse_partial "${reasons[@]}"
export OPENBLAS_NUM_THREADS=$THREADS OMP_WAIT_POLICY=PASSIVE
cmake --build "$BUILD" --target peft-bench-train -j "$(nproc)"

bench="$BUILD/benchmarks/peft-bench-train"
gpt2="$BUILD/bench/gpt2-small-hf"
[ -f "$gpt2/model.safetensors" ] || "$bench" make "$gpt2" --shape gpt2-small
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# measure NAME COMMAND...: appends "step_seconds peak_rss_mib" of one run to $out/NAME.
measure() {
  local name=$1
  shift
  "$@" | awk '/^step_s/ {s = $2} /^peak_rss_mib/ {r = $2} END {print s, r}' >> "$out/$name"
}
cpp() { measure "$1" "$bench" --model "$gpt2" --threads "$THREADS" "${@:2}"; }
py() { measure "$1" /usr/bin/python3 benchmarks/peer_gpt2.py --model "$gpt2" --threads "$THREADS" "${@:2}"; }

for run in $(seq "$RUNS"); do
  echo "round $run of $RUNS" >&2
  py py_lora --mode lora
  cpp lora --method lora
  py py_lora_ckpt --mode lora_ckpt
  cpp lora_lean --method lora --checkpointing --chunked-loss
  cpp lora_chunked --method lora --chunked-loss
  cpp full --method full
  cpp qlora --method qlora
  cpp qlora_lean --method qlora --checkpointing --chunked-loss
  cpp infer_base --infer base
  cpp infer_unmerged --infer unmerged
  cpp infer_merged --infer merged
done

# row LABEL A B COLUMN GOAL: median (min–max) of A/B over the runs (COLUMN 1: step time, 2: peak RSS).
row() {
  paste -d' ' "$out/$2" "$out/$3" | awk -v label="$1" -v c="$4" -v goal="$5" -v unit="$([ "$4" = 1 ] && echo s || echo MiB)" '
    function med(x, n,   i, j, t) { for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (x[j] < x[i]) { t = x[i]; x[i] = x[j]; x[j] = t }
                                   return x[int((n + 1) / 2)] }
    { r[NR] = $c / $(c + 2); a[NR] = $c; b[NR] = $(c + 2) }
    END { n = NR; m = med(r, n); ma = med(a, n); mb = med(b, n)
          fmt = unit == "s" ? "| %s | %.3f (%.3f–%.3f) (%.2f s / %.2f s) | %s |\n" : "| %s | %.3f (%.3f–%.3f) (%d MiB / %d MiB) | %s |\n"
          printf fmt, label, m, r[1], r[n], ma, mb, goal }'
}
table=$(
  echo "| figure | value | goal |"
  echo "| --- | --- | --- |"
  row "QLoRA / LoRA training peak RSS, both with checkpointing + chunked loss" qlora_lean lora_lean 2 "<= 0.75"
  row "QLoRA / LoRA training peak RSS, both plain" qlora lora 2 "<= 0.90"
  row "LoRA + checkpointing + chunked loss / full fine-tuning, peak RSS" lora_lean full 2 "<= 0.30"
  row "step time with checkpointing / without (LoRA, chunked loss both)" lora_lean lora_chunked 1 "<= 1.35"
  row "C++ LoRA step / Python peer LoRA step (both plain)" lora py_lora 1 "<= 0.95"
  row "C++ LoRA (checkpointing + chunked loss) / Python peer plain, peak RSS" lora_lean py_lora 2 "<= 0.60"
  row "C++ LoRA (checkpointing + chunked loss) / Python peer with torch.utils.checkpoint, peak RSS" lora_lean py_lora_ckpt 2 "<= 0.90"
  row "C++ LoRA plain / Python peer plain, peak RSS" lora py_lora 2 ""
  row "unmerged LoRA inference / base inference, peak RSS" infer_unmerged infer_base 2 "<= 1.03"
  row "merged LoRA inference / base inference, peak RSS" infer_merged infer_base 2 "<= 1.03"
)

llama_table=""
if [ "$LLAMA_1B" = 1 ]; then
  llama="$BUILD/bench/llama-1b-hf"
  [ -f "$llama/model.safetensors" ] || "$bench" make "$llama" --shape llama-1b
  llama_table=$(
    echo "| method (checkpointing + chunked loss, batch 1 x 512, AdamW) | peak RSS | step |"
    echo "| --- | --- | --- |"
    for m in qlora lora full; do
      # Full fine-tuning needs about 16 bytes per parameter with AdamW: it may not fit this machine.
      if result=$(timeout 1200 "$bench" --model "$llama" --threads "$THREADS" --method "$m" --checkpointing --chunked-loss --batch 1 --seq 512 --steps 0 2>&1); then
        echo "$result" | awk -v m="$m" '/^step_s/ {s = $2} /^peak_rss_mib/ {r = $2} END {printf "| %s | %d MiB | %.0f s |\n", m, r, s}'
      else
        echo "| $m | did not finish on this machine ($(free -g | awk '/^Mem:/ {print $2}') GiB): $(echo "$result" | tail -1) | |"
      fi
    done
  )
fi

libtorch=$(dpkg-query -W -f='${Version}' libtorch-dev 2>/dev/null || echo unknown)
section=$(cat <<MD
Measured $(machine_line), $THREADS threads, LibTorch $libtorch, command
\`benchmarks/train_memory.sh\`. Every figure: median (min–max) of ratios over $RUNS
rounds in which every configuration ran once, each in its own process (peak RSS is
per process), alternating C++ and Python. Model: a random GPT-2-small HF folder
(124 M, vocab 50257, tied lm_head, dropout 0.1) loaded by \`peft::hf\`, batch 4 x 128,
AdamW; LoRA r=8 (alpha 16, dropout 0.05) on every \`c_attn\`; QLoRA: the same over an
NF4 base of every block linear. The Python peer (\`benchmarks/peer_gpt2.py\`, Debian's
python3-torch, the same LibTorch) is transformers' GPT-2 math with LoRA in a few lines
of PyTorch and the usual cross entropy over full logits, plain or with
\`torch.utils.checkpoint\` per block.

$table

What moves these peaks besides the method: glibc raises its mmap threshold each
time a large block is freed (up to 32 MiB), after which activations and QLoRA's
dequantised temporaries come from the heap, which fragments; a fixed threshold
(\`MALLOC_MMAP_THRESHOLD_=1048576\`) lowers every C++ and Python peak here. And
\`peft::hf\` builds a model with its random initialisation before the checkpoint's
mapped tensors replace it, so loading peaks near the model's fp32 size; in a
configuration that trains in less, that load peak is the figure.

Peak RSS of training a 1.2 B-parameter Llama shape (Llama 3.2 1B's: hidden 2048,
16 layers, GQA 32/8 heads, vocab 128256, tied embeddings; random weights, fp32),
one step (its time includes the first step's allocations):

$llama_table
MD
)
publish docs/performance.md train_memory "Training memory: checkpointing, chunked loss, QLoRA, against a Python peer" "$section"
