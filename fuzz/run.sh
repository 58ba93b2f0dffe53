#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (ASan) and runs each for SECONDS
# seconds (default 60) on a corpus seeded with valid files written by the
# library and their truncated / bit-flipped variants.
#   fuzz/run.sh [SECONDS]        BUILD (default build-fuzz)
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${1:-60}
B=${BUILD:-build-fuzz}
mkdir -p "$B"
cmake -S . -B "$B" -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPEFT_FUZZ=ON \
  -DPEFT_BUILD_TESTS=OFF -DPEFT_BUILD_EXAMPLES=OFF -DPEFT_BUILD_BENCHMARKS=OFF -DPEFT_WITH_ASSETS=OFF > "$B/configure.log" 2>&1 \
  || { tail -30 "$B/configure.log"; exit 1; }
cmake --build "$B" -j "$(nproc)" --target fuzz_safetensors fuzz_config fuzz_from_pretrained
# Leaks inside LibTorch (its registries and caches) are suppressed; the project's own are not.
export LSAN_OPTIONS="suppressions=$PWD/fuzz/lsan.supp:print_suppressions=0"
failed=0
for target in ${TARGETS:-safetensors config from_pretrained}; do
  corpus="$B/corpus/$target"
  mkdir -p "$corpus"
  echo "== fuzz_$target for $SECONDS_EACH s"
  PEFT_FUZZ_SEEDS="$corpus" "$B/fuzz/fuzz_$target" -max_total_time="$SECONDS_EACH" -rss_limit_mb=4096 \
    -print_final_stats=1 "$corpus" > "$B/fuzz_$target.log" 2>&1 || { tail -40 "$B/fuzz_$target.log"; failed=1; }
  grep -a -E "^Done |#[0-9]+\s+DONE|stat::peak_rss_mb" "$B/fuzz_$target.log" | tail -3
  echo "corpus: $(ls "$corpus" | wc -l) inputs"
done
exit $failed
