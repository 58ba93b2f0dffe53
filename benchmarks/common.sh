# Sourced by the benchmark scripts: where results go, and the --update-docs option.
#
# By default a benchmark writes its section to $BUILD/benchmark-results/<name>.md
# and leaves the tracked docs alone (git status stays clean). With --update-docs
# it also replaces that section of the doc, which each script allows only for a
# complete run under the documented budget (refuse_partial).

shopt -s inherit_errexit  # a failing run inside $(...) stops the script: no table from failed runs

UPDATE_DOCS=0
POSITIONAL=()
for arg in "$@"; do
  case "$arg" in
    --update-docs) UPDATE_DOCS=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "$(basename "$0"): unknown option '$arg' (only --update-docs)" >&2; exit 2 ;;
    *) POSITIONAL+=("$arg") ;;
  esac
done

# refuse_partial REASON...: with --update-docs, stops before running when a reason is given.
refuse_partial() {
  if [ "$UPDATE_DOCS" = 1 ] && [ $# -gt 0 ]; then
    local joined
    joined=$(printf '%s; ' "$@")
    echo "$(basename "$0"): --update-docs refused: ${joined}the docs hold only complete runs at the documented budget" >&2
    exit 2
  fi
}

# machine_line: the CPU and date every section states (figures are for one machine).
machine_line() {
  echo "$(date -u +%Y-%m-%d), $(nproc) cores ($(lscpu | sed -n 's/^Model name: *//p'))"
}

# publish DOC NAME TITLE BODY: writes the section to $BUILD/benchmark-results/NAME.md,
# and into DOC (between <!-- BEGIN NAME --> and <!-- END NAME -->) with --update-docs.
publish() {
  local doc=$1 name=$2 title=$3 body=$4 out="$BUILD/benchmark-results"
  mkdir -p "$out"
  printf '## %s\n\n%s\n' "$title" "$body" > "$out/$name.md"
  echo "wrote $out/$name.md"
  if [ "$UPDATE_DOCS" = 1 ]; then
    /usr/bin/python3 benchmarks/write_section.py "$doc" "$name" "$title" "$body"
    echo "updated the '$name' section of $doc"
  fi
}
