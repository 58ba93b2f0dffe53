#!/usr/bin/env bash
# Creates (or reuses) the reference venv: the real HF peft, transformers,
# safetensors, tokenizers, gguf, bitsandbytes and the torch 2.x they need, at the
# versions pinned in tools/reference/requirements.txt. It lives outside the clone
# (~5.7 GB, most of it torch's CUDA libraries), keyed by the pin file's hash, and
# is reused when present. Prints the venv's python on the last line of stdout.
#   PEFT_REF_VENV_ROOT (default: ${XDG_CACHE_HOME:-$HOME/.cache}/peft-cpp)
set -euo pipefail
cd "$(dirname "$0")/.."
pins=tools/reference/requirements.txt
root=${PEFT_REF_VENV_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/peft-cpp}
venv="$root/ref-venv-$(sha256sum "$pins" | cut -c1-12)"

if [ ! -f "$venv/.complete" ]; then
  # Debian's python3 needs python3-venv for ensurepip.
  if ! /usr/bin/python3 -c 'import ensurepip' 2>/dev/null; then
    [ "$(id -u)" -eq 0 ] || { echo "reference_env: install python3-venv (apt-get)" >&2; exit 1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv >&2
  fi
  start=$SECONDS
  rm -rf "$venv"
  mkdir -p "$root"
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$pins" >&2
  touch "$venv/.complete"
  echo "reference_env: created $venv in $((SECONDS - start)) s" >&2
fi
"$venv/bin/python" -c 'import torch, peft, transformers, safetensors, tokenizers, gguf' >&2
echo "$venv/bin/python"
