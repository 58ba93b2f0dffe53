#!/usr/bin/env bash
# ctest benchmarks.leave_docs_alone: a benchmark run without --update-docs writes
# its table to the build folder only, and --update-docs refuses a partial run
# before running anything; docs/ and README.md stay byte-identical.
#   tests/benchmarks_leave_docs.sh BUILD_DIR
set -euo pipefail
build=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
digest() { find docs README.md -type f -print0 | sort -z | xargs -0 md5sum | md5sum; }
before=$(digest)
small=(env BUILD="$build" METHODS=linear-probe EPOCHS=1 MAX_TOKENS=8 REPEATS=1 FRESH=1)
"${small[@]}" benchmarks/results.sh > "$build/benchmarks_leave_docs.log"
grep -q '^| linear-probe | 1,026 (0.01 %) | 0\.[0-9]* (' "$build/benchmark-results/results.md"
if "${small[@]}" benchmarks/results.sh --update-docs 2> "$build/benchmarks_refusal.log"; then
  echo "--update-docs accepted a partial run" >&2
  exit 1
fi
grep -q "refused: METHODS='linear-probe' is not every method" "$build/benchmarks_refusal.log"
[ "$before" = "$(digest)" ] || { echo "a benchmark changed docs/ or README.md" >&2; exit 1; }
echo "docs untouched; table in $build/benchmark-results/results.md"
