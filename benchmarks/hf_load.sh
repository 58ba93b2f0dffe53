#!/usr/bin/env bash
# Peak RSS and time of loading a Hugging Face folder with peft::hf (parameters as
# views of the memory-mapped file) against the copying loader it replaced (file
# read into memory, tensors copied out, then into the parameters), each in its own
# process, side by side: the real all-MiniLM-L6-v2 (91 MB) and a synthetic Llama
# of 166 M parameters (fp32, 634 MiB) written once into $BUILD/hf_load/.
# Writes $BUILD/benchmark-results/hf_load.md; --update-docs also the section of
# docs/performance.md.
#   benchmarks/hf_load.sh [--update-docs]     BUILD (build)
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/common.sh
BUILD=${BUILD:-build}
refuse_partial
cmake --build "$BUILD" --target peft-bench-hf-load -j "$(nproc)"
bench="$BUILD/benchmarks/peft-bench-hf-load"
synthetic="$BUILD/hf_load/llama-166m"
[ -f "$synthetic/model.safetensors" ] || "$bench" make "$synthetic" --hidden 1024 --layers 8
rows=""
for dir in assets/all-minilm-l6-v2 "$synthetic"; do
  for mode in copied mapped; do
    line=$(OMP_NUM_THREADS=2 "$bench" "$mode" "$dir")
    echo "$line"
    rows+="| $(basename "$dir") | $mode | $(echo "$line" | sed -E 's/.*file ([0-9]+) MiB, peak RSS ([0-9]+) MiB, ([0-9.]+) s/\1 MiB | \2 MiB | \3 s/') |"$'\n'
  done
done
body="Produced by \`benchmarks/hf_load.sh\` on $(machine_line): one process per row, the files in the page cache
(read or written shortly before). *copied*: the loader before memory mapping (file read into memory, tensors
copied out, then into the freshly initialised parameters). *mapped*: \`peft::hf\`'s loader (the parameters
become views of the copy-on-write mapped file; pages are shared with the page cache until written).

| folder | loader | file | peak RSS | time |
| --- | --- | --- | --- | --- |
$rows"
publish docs/performance.md hf_load "Loading a Hugging Face folder: peak RSS" "$body"
