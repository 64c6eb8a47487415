#!/bin/sh
# tests/llama-oracle, the harness on llama.cpp that moe-run is checked
# against (doc/peers.md): on a tiny MoE that llama.cpp builds itself from
# keys (mkmodel), and on moe-gen's GGUF where moe-gen is built, its
# subcommands run and agree with each other: the logits file is well formed
# and its argmaxes are the printed ones; greedy's ids are the argmaxes of a
# teacher-forced pass over the same ids; tokenize and detok invert each other.
set -eu
B=${MOETIER_BUILDDIR:-.}
O=$B/tests/llama-oracle
PY=/usr/bin/python3
if [ ! -x "$O" ]; then
	echo "SKIP: llama.cpp peer absent (scripts/install-deps, then configure --with-llama)"
	exit 77
fi
if ! "$PY" -c 'import numpy' 2>/dev/null; then
	echo "SKIP: $PY with numpy is needed to read the logits files"
	exit 77
fi
tmp=$(mktemp -d "${TMPDIR:-/tmp}/moetier-oracle.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# The same seed names the same model.
"$O" mkmodel "$tmp/a.gguf" --arch qwen3moe --seed 11
"$O" mkmodel "$tmp/b.gguf" --arch qwen3moe --seed 11
cmp "$tmp/a.gguf" "$tmp/b.gguf"
models="$tmp/a.gguf"
for arch in qwen2moe olmoe llama; do
	"$O" mkmodel "$tmp/$arch.gguf" --arch "$arch" --seed 12
	models="$models $tmp/$arch.gguf"
done
if [ -x "$B/tools/moe-gen" ]; then
	"$B/tools/moe-gen" model --family qwen3_moe --format gguf --preset tiny --seed 5 --out "$tmp/gen" >/dev/null
	models="$models $tmp/gen/model.gguf"
fi

check() { # model
	m=$1
	echo "== $m"
	prompt=1,30,31,32,33,34,2,9 # below every vocab here (moe-gen tiny: 64)
	# Teacher-forced logits: file and printed argmaxes agree.
	"$O" logits "$m" --tokens "$prompt" --out "$tmp/l.bin"
	"$O" logits "$m" --tokens "$prompt" >"$tmp/l.txt"
	# In chunks of 3 the rows are the same (to rounding: other batch shapes).
	"$O" logits "$m" --tokens "$prompt" --batch 3 --out "$tmp/l3.bin"
	gen=$("$O" greedy "$m" --tokens "$prompt" -n 8)
	echo "greedy: $gen"
	# The prompt followed by greedy's ids, teacher-forced in one batch.
	"$O" logits "$m" --tokens "$prompt,$gen" --out "$tmp/lg.bin"
	"$PY" - "$tmp" "$prompt" "$gen" <<'EOF'
import sys, numpy as np
tmp, prompt, gen = sys.argv[1], [int(x) for x in sys.argv[2].split(',')], [int(x) for x in sys.argv[3].split(',')]
def load(path):
    b = open(path, 'rb').read()
    assert b[:8] == b'MOELGT01', 'bad magic'
    n, v = np.frombuffer(b[8:16], '<u4')
    assert len(b) == 16 + 4 * int(n) * int(v), 'bad size'
    x = np.frombuffer(b[16:], '<f4').reshape(int(n), int(v))
    assert np.isfinite(x).all(), 'non-finite logits'
    return x
x = load(tmp + '/l.bin')
assert x.shape[0] == len(prompt), x.shape
assert x.std() > 1e-3, 'constant logits'
rows = [l.split() for l in open(tmp + '/l.txt')]
assert len(rows) == len(prompt)
for i, (pos, am, mx) in enumerate(rows):
    assert int(pos) == i and int(am) == int(np.argmax(x[i])), (i, am, np.argmax(x[i]))
    assert abs(float(mx) - x[i].max()) <= 1e-6 * max(1.0, abs(x[i].max()))
# Batch shape changes only rounding: 1e-4 of the logits' scale.
x3 = load(tmp + '/l3.bin')
scale = np.abs(x).max()
assert np.abs(x3 - x).max() <= 1e-4 * scale, np.abs(x3 - x).max()
# Greedy with a KV cache, one token at a time, picks the argmax of the
# teacher-forced rows; where a near tie (1e-4 of the scale) flips it, the
# pick must still be the maximum to that rounding.
g = load(tmp + '/lg.bin')
assert g.shape[0] == len(prompt) + len(gen)
assert gen[0] == int(np.argmax(x[-1])) or x[-1].max() - x[-1][gen[0]] <= 1e-4 * scale
for k, t in enumerate(gen):
    row = g[len(prompt) - 1 + k]
    assert row.max() - row[t] <= 1e-4 * scale, (k, t, int(np.argmax(row)), row.max() - row[t])
print('logits ok: %d x %d, scale %.3g, batch-3 diff %.3g' % (x.shape[0], x.shape[1], scale, np.abs(x3 - x).max()))
EOF
	# Speed line of the benchmark's llama.cpp side.
	"$O" decode "$m" --prompt-tokens "$prompt" --feed-tokens 5,6,7,8 2>/dev/null >"$tmp/d.txt"
	grep -Eq '^llama-oracle: prefill_tps=[0-9.]+ decode_tps=[0-9.]+ n_decode=4$' "$tmp/d.txt"
	grep -Eq '^llama-oracle: load_s=[0-9.]+ .* read_decode_mib_per_tok=-?[0-9.]+$' "$tmp/d.txt"
}
for m in $models; do
	check "$m"
done

# Tokenizer (llama.cpp's SentencePiece on mkmodel's vocabulary): BOS first
# unless --no-special, and detok gives the text back.
m=$tmp/a.gguf
[ "$("$O" info "$m")" = n_vocab=512 ]
ids=$("$O" tokenize "$m" "hello the world")
plain=$("$O" tokenize "$m" --no-special "hello the world")
[ "$ids" = "1,$plain" ] || { echo "tokenize: BOS expected: $ids vs $plain" >&2; exit 1; }
text=$("$O" detok "$m" "$plain")
[ "$text" = "hello the world" ] || [ "$text" = " hello the world" ] ||
	{ echo "detok: '$text'" >&2; exit 1; }
printf 'the dog\n' >"$tmp/t.txt"
[ "$("$O" tokenize "$m" --file "$tmp/t.txt")" = "$("$O" tokenize "$m" "the dog
")" ]
# parse-special turns "</s>" into EOS (2) rather than its characters.
[ "$("$O" tokenize "$m" --no-special --parse-special "</s>")" = 2 ]
[ "$("$O" tokenize "$m" --no-special "</s>")" != 2 ]

# Errors: llama.cpp's reason and exit 1, never a crash.
printf 'not a gguf' >"$tmp/bad.gguf"
if "$O" logits "$tmp/bad.gguf" --tokens 1 2>"$tmp/err"; then exit 1; fi
grep -q 'invalid magic' "$tmp/err"
grep -q 'llama.cpp cannot load the model' "$tmp/err"
if "$O" logits "$m" --tokens 1,99999 2>"$tmp/err"; then exit 1; fi
grep -q 'n_vocab' "$tmp/err"
echo "llama-oracle: all checks passed"
