#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (ASan) and runs each for SECONDS
# seconds (default 60) on a corpus seeded with valid files written by the
# library and their truncated / bit-flipped variants.
#   fuzz/run.sh [SECONDS]        BUILD (default build-fuzz), PARALLEL=1 runs the targets at once
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${1:-60}
B=${BUILD:-build-fuzz}
mkdir -p "$B"
cmake -S . -B "$B" -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPEFT_FUZZ=ON \
  -DPEFT_BUILD_TESTS=OFF -DPEFT_BUILD_EXAMPLES=OFF -DPEFT_BUILD_BENCHMARKS=OFF -DPEFT_WITH_ASSETS=OFF > "$B/configure.log" 2>&1 \
  || { tail -30 "$B/configure.log"; exit 1; }
cmake --build "$B" -j "$(nproc)" --target fuzzers
# Leaks inside LibTorch (its registries and caches) are suppressed; the project's own are not.
export LSAN_OPTIONS="suppressions=$PWD/fuzz/lsan.supp:print_suppressions=0"
fuzz_one() {
  local target=$1 corpus="$B/corpus/$1"
  mkdir -p "$corpus"
  PEFT_FUZZ_SEEDS="$corpus" "$B/fuzz/fuzz_$target" -max_total_time="$SECONDS_EACH" -rss_limit_mb=4096 \
    -print_final_stats=1 "$corpus" > "$B/fuzz_$target.log" 2>&1 || { tail -40 "$B/fuzz_$target.log"; return 1; }
}
report() {
  echo "== fuzz_$1, $SECONDS_EACH s: $(grep -a -E "#[0-9]+\s+DONE" "$B/fuzz_$1.log" | tail -1)"
  grep -a -E "stat::number_of_executed_units|stat::peak_rss_mb" "$B/fuzz_$1.log" | tr '\n' ' '
  echo "corpus: $(ls "$B/corpus/$1" | wc -l) inputs"
}
TARGETS=${TARGETS:-safetensors config from_pretrained}
failed=0
if [ "${PARALLEL:-0}" = 1 ]; then  # all at once: SECONDS_EACH of wall time in all, sharing the cores
  pids=()
  for target in $TARGETS; do fuzz_one "$target" & pids+=($!); done
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
else
  for target in $TARGETS; do fuzz_one "$target" || failed=1; done
fi
for target in $TARGETS; do report "$target"; done
exit $failed
