// The independent JavaScript check of tests/data/tokenizer_expected.json: HF's own
// JavaScript tokenizers (@huggingface/tokenizers, pinned in scripts/fetch_assets.sh,
// no dependencies) encode and decode the corpus with every tokenizer.json variant,
// and any disagreement with the Rust reference (HF tokenizers, which the expected
// file holds) is listed. Rust is the reference: a disagreement is the JS library's.
//   node tools/tokenizer_reference.mjs [ASSETS_DIR]
// Prints one line per variant (with the first disagreements) and a summary. It informs:
// it exits 0 whatever JS gives, and 1 only when JS cannot load one of the real files.
import { readFileSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const assets = resolve(process.argv[2] ?? resolve(root, 'assets'));
const { Tokenizer } = await import(pathToFileURL(resolve(assets, 'hf-tokenizers-js/dist/tokenizers.mjs')).href);

const corpus = JSON.parse(readFileSync(resolve(root, 'tests/data/tokenizer_corpus.json'), 'utf8'));
const expected = JSON.parse(readFileSync(resolve(root, 'tests/data/tokenizer_expected.json'), 'utf8'));

// tools/tokenizer_reference.py's apply_patch: dotted paths set, "+key" appends to a list
function applyPatch(json, patch) {
  const j = structuredClone(json);
  for (const [path, value] of Object.entries(patch)) {
    if (path.startsWith('+')) {
      j[path.slice(1)] = j[path.slice(1)].concat(structuredClone(value));
      continue;
    }
    const parts = path.split('.');
    let node = j;
    for (const p of parts.slice(0, -1)) node = node[p];
    node[parts.at(-1)] = structuredClone(value);
  }
  return j;
}

const same = (a, b) => a.length === b.length && a.every((x, i) => x === b[i]);

// The JS library applies neither tokenizer.json's padding nor its truncation: Rust's ids
// without the file's pad tokens are what it can give.
function unpadded(ids, json) {
  if (!json.padding) return ids;
  const pad = json.padding.pad_id;
  const out = [...ids];
  if (json.padding.direction === 'Left') while (out.length && out[0] === pad) out.shift();
  else while (out.length && out.at(-1) === pad) out.pop();
  return out;
}

let agreeing = 0, unloadable = 0;
for (const v of expected.variants) {
  const json = applyPatch(JSON.parse(readFileSync(resolve(assets, v.file), 'utf8')), v.patch);
  let tok;
  try {
    tok = new Tokenizer(json, {});
  } catch (e) {
    console.log(`${v.name}${Object.keys(v.patch).length ? ' (patched)' : ''}: JS cannot load it (${e.message})`);
    unloadable += Object.keys(v.patch).length === 0;
    continue;
  }
  const bad = [];
  let paddingOnly = 0;
  corpus.forEach((text, i) => {
    const want = v.results[i];
    let ids, decoded;
    try {
      ids = tok.encode(text, { add_special_tokens: true }).ids.map(Number);
      // JS refuses to decode no ids ("token_ids must be a non-empty array"): Rust gives ""
      decoded = ids.length ? tok.decode(ids, { skip_special_tokens: false, clean_up_tokenization_spaces: false }) : '';
    } catch (e) {
      bad.push(`  corpus[${i}] ${JSON.stringify(text).slice(0, 60)}: JS throws ${e.message}`);
      return;
    }
    const wantText = want.decoded ?? text;
    if (same(ids, want.ids) && decoded === wantText) return;
    const cut = json.truncation && unpadded(want.ids, json).length >= json.truncation.max_length;  // truncation acted
    if (!cut && same(ids, unpadded(want.ids, json))) {
      paddingOnly += 1;
      return;
    }
    bad.push(`  corpus[${i}] ${JSON.stringify(text).slice(0, 60)}\n    Rust ${JSON.stringify(want.ids)} ${JSON.stringify(wantText)}` +
             `\n    JS   ${JSON.stringify(ids)} ${JSON.stringify(decoded)}`);
  });
  const real = Object.keys(v.patch).length === 0;
  const note = paddingOnly ? ` (${paddingOnly} of them only without the file's padding, which JS does not apply)` : '';
  console.log(`${v.name}${real ? '' : ' (patched)'}: ${corpus.length - bad.length}/${corpus.length} strings agree with Rust${note}`);
  for (const line of bad.slice(0, 4)) console.log(line.length > 700 ? line.slice(0, 700) + '...' : line);
  agreeing += bad.length === 0;
}
console.log(`tokenizer_reference.mjs: JS agrees with Rust on every string for ${agreeing} of ${expected.variants.length} ` +
            'variants; where they differ, Rust (HF tokenizers) is the reference');
process.exit(unloadable ? 1 : 0);
