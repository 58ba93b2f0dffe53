#!/usr/bin/env bash
# Data-parallel throughput on one machine: peft-finetune with 1 process x 1 thread
# vs 2 processes x 1 thread (peft-launch), LoRA and full fine-tuning, one epoch of
# 32-token emails; writes the table into docs/performance.md ("distributed" section).
#   benchmarks/distributed.sh [BUILD_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}
cmake --build "$BUILD" --target peft-finetune peft-launch -j "$(nproc)"
run() {  # run METHOD NPROC
  local out="$BUILD/dist_bench/$1_$2"
  "$BUILD"/examples/peft-launch --nproc-per-node "$2" --master-port $((29600 + $2)) -- \
    "$BUILD"/examples/peft-finetune --method "$1" --epochs 1 --max-tokens 32 --threads 1 --out "$out" > "$out.log" 2>&1 \
    || { tail -20 "$out.log"; exit 1; }
  echo "$out/metrics.json"
}
mkdir -p "$BUILD/dist_bench"
rows=$(for method in lora full; do
  one=$(run $method 1); two=$(run $method 2)
  /usr/bin/python3 - "$method" "$one" "$two" <<'PY'
import json, sys
method, one, two = sys.argv[1], json.load(open(sys.argv[2])), json.load(open(sys.argv[3]))
train = one["train_emails"]
t1, t2 = one["seconds_per_epoch"], two["seconds_per_epoch"]
per_step = two["allreduced_bytes_per_step"]
print(f"| {method} | {train / t1:.1f} | {train / t2:.1f} | {t1 / t2:.2f} | {per_step / 1024:.1f} KiB | "
      f"{one['test_accuracy']:.4f} / {two['test_accuracy']:.4f} |")
PY
done)
section=$(cat <<MD
Measured $(date -u +%Y-%m-%d) on $(nproc) cores ($(lscpu | sed -n 's/^Model name: *//p')), command
\`benchmarks/distributed.sh\`: \`peft-finetune\` (USE-Lite + SpamAssassin), one epoch of
32-token emails, global batch 32, each process 1 thread; 2 processes started by
\`peft-launch\` on loopback (Gloo), each taking 16 rows of every batch.

| method | emails/s, 1 process | emails/s, 2 processes | speed-up | all-reduced per step | test accuracy 1 / 2 processes |
| --- | --- | --- | --- | --- | --- |
$rows

Only the trainable tensors are all-reduced, once per step; full fine-tuning
sends every weight.
MD
)
/usr/bin/python3 benchmarks/write_section.py distributed "Data-parallel training (c10d, Gloo)" "$section"
echo "$section"
