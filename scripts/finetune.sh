#!/usr/bin/env bash
# The main job: set up, build and run peft-finetune with its defaults.
# Extra arguments go to peft-finetune (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}

scripts/setup.sh
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release
cmake --build "$BUILD_DIR" -j "$(nproc)" --target peft-finetune
"$BUILD_DIR"/examples/peft-finetune "$@"
