// Writes the GPT-2 token ids of a fixed list of strings, computed by the npm
// package gpt-3-encoder@1.1.4's own JavaScript encoder, for tests/test_bpe.cpp.
//   node tools/gpt2_reference_ids.js assets/gpt-3-encoder > tests/data/gpt2_bpe_reference.json
const path = require('path');
const { encode } = require(path.resolve(process.argv[2], 'Encoder.js'));
const strings = [
  'Hello world',
  'Call me Ishmael. Some years ago—never mind how long precisely—having little or no money in my purse,',
  "It's what they'd've said: we're here, you'll see, I'm sure, don't.",
  "'S 'T 'RE (contractions are lower-case only) O'Neil's",
  'Numbers: 1790, 3.14159, 2,000,000 and 1st 2nd 42nd; ½ ² Ⅻ',
  '  two leading spaces,   three inside, trailing   ',
  'tabs\tand\nnewlines\n\n\nand\r\nwindows line ends\n',
  'Mixed    \n  whitespace \t\t before words',
  'Unicode: café naïve Ærøskøbing São Paulo Łódź Привет мир Γειά σου',
  '日本語のテキスト、中文文本。한국어 텍스트',
  'Emoji 😀👍🏽 and symbols © ® ™ € £ ¥ → ∑ ∞',
  'Punctuation!!! ??? ... --- *** ### @@@ $$$ %%% ^^^ &&& ((( ))) [[[ ]]] {{{ }}}',
  'def f(x):\n    return x ** 2  # code\n',
  '<|endoftext|> is written as plain text here',
  'MR. PRESIDENT, MEMBERS OF CONGRESS: the State of the Union is strong.',
  'a',
  ' ',
  '',
  'supercalifragilisticexpialidocious antidisestablishmentarianism',
  'non\u00a0breaking\u2003em\u3000ideographic spaces',
];
const out = strings.map(text => ({ text, ids: encode(text) }));
process.stdout.write('[\n' + out.map(o => JSON.stringify(o)).join(',\n') + '\n]\n');
