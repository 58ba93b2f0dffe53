#!/usr/bin/env bash
# Throughput and latency of peft-serve under a bounded load: the ctest
# PeftServe.TwoHundredRequestsFromEightClientsAreAllAnsweredCorrectly (200
# completions of 8 tokens from 8 concurrent clients over two LoRA adapters and
# the base of a small Llama; every answer checked against the library's
# generation alone), ROUNDS times, each round's numbers kept.
# Writes $BUILD/benchmark-results/serve_load.md; --update-docs also the section of
# docs/performance.md.
#   benchmarks/serve_load.sh [--update-docs]     BUILD (build), ROUNDS (3)
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/common.sh
BUILD=${BUILD:-build}
ROUNDS=${ROUNDS:-3}
refuse_partial
cmake --build "$BUILD" --target peft_tests peft-serve -j "$(nproc)"
rows=""
for round in $(seq "$ROUNDS"); do
  result="$BUILD/benchmark-results/serve_load.$round.json"
  mkdir -p "$(dirname "$result")"
  PEFT_SERVE_LOAD_RESULT="$result" OMP_WAIT_POLICY=PASSIVE "$BUILD/tests/peft_tests" \
    --gtest_filter=PeftServe.TwoHundredRequestsFromEightClientsAreAllAnsweredCorrectly > /dev/null
  rows+=$(/usr/bin/python3 -c 'import json, sys; print("| %(round)s | %(requests)d | %(clients)d | %(seconds).2f s | %(requests_per_s).0f | %(p50_ms).1f ms | %(p99_ms).1f ms | %(wrong)d |" % dict(json.load(open(sys.argv[1])), round=sys.argv[2]))' "$result" "$round")$'\n'
done
echo "$rows"
body="Produced by \`benchmarks/serve_load.sh\` on $(machine_line): peft-serve (\`--threads 1\`, \`--max-concurrent 8\`)
on a 2-layer Llama (hidden 64, byte-level vocabulary of 257) with LoRA adapters \`a\` and \`b\`; 8 client threads
send 200 greedy completions of 8 tokens between them, cycling through \`a\`, \`b\` and the base and four prompts;
latency from sending a request to its whole answer. *wrong*: answers that differ from the library's generation of
that prompt and adapter alone (the test fails on any).

| round | requests | clients | wall | requests/s | p50 latency | p99 latency | wrong |
| --- | --- | --- | --- | --- | --- | --- | --- |
$rows"
publish docs/performance.md serve_load "Serving: peft-serve under load" "$body"
