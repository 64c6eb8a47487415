#!/bin/sh
# moe-run against llama.cpp: for each architecture (qwen3moe, qwen2moe,
# olmoe, llama = Mixtral) and each of F32 and Q8_0, a tiny moe-gen GGUF is
# packed, moe-run --local writes the teacher-forced logits of 24 tokens, and
# tests/llama-oracle writes llama.cpp's for the same GGUF; logits-compare.py
# checks them. Also: batched prefill, one token at a time and 2 threads give
# the same bits; greedy decoding of 64 tokens gives llama.cpp's ids; --ppl
# equals the perplexity of llama.cpp's logits of the same chunks. Skips (77) when llama-oracle was not built (no llama.cpp)
# or Debian's python3 has no numpy.
#
# Tolerances (per row: max |ours - llama.cpp| / max |llama.cpp logit|;
# the test bounds the worst row and the median row: a systematic mistake --
# a wrong RoPE pairing, norm, bias or routing weight -- moves every row by
# > 1e-2, a rounding flip moves a few).
# llama.cpp runs without flash attention (its CPU kernel rounds Q to f16)
# and with its default F16 KV cache, so moe-run --kv-f16 rounds K, V, q and
# the softmax output to f16 where llama.cpp's mul_mats do. (Where
# llama-oracle offers --kv-f32 both sides keep f32 for the F32 models, the
# greedy and --ppl checks, and F32 is held to 1e-5. The Q8_0 models keep the
# F16 cache on both sides: there the f16 rounding of K and V makes both
# sides' attention outputs the same bits (measured 1e-7 per row), while with
# f32 caches an ulp of accumulation order flips a Q8_0 activation code in an
# early row and every later row moves by ~5e-3 through the KV cache, over
# the median bound.)
#  - F32: accumulation order only (ggml's SIMD sums vs kernels/), ~2e-7 with
#    an f32 cache on both sides; with f16 rounding, now and then a value an
#    ulp apart rounds to the neighbouring f16 (2^-11 of one element):
#    measured worst rows 1e-6..6.6e-5, medians <= 1e-6. tol 2e-4, median 1e-5.
#  - Q8_0: both sides quantise activations per 32-block the same way
#    (kernels/ffn.h's integer q8_0 dot is ggml's), measured ~1e-7 in most
#    rows; but an activation on a rounding boundary can take the
#    neighbouring int8 code on one side (an ulp of accumulation order
#    decides), a step of max|block|/127 that flows into the later rows
#    through the KV cache: seen up to 5.5e-3 on single rows, in up to a
#    third of the rows. tol 2e-2, median 1e-4.
set -eu
B=${MOETIER_BUILDDIR:-.}
S=${MOETIER_SRCDIR:-..}
PY=/usr/bin/python3
oracle=$B/tests/llama-oracle

for p in moe-run tools/moe-gen tools/moe-pack; do
	[ -x "$B/$p" ] || { echo "test_moe_run: $B/$p is missing" >&2; exit 1; }
done
if [ ! -x "$oracle" ]; then
	echo "test_moe_run: tests/llama-oracle not built (no llama.cpp): skip"
	exit 77
fi
if ! $PY -c 'import numpy' 2>/dev/null; then
	echo "test_moe_run: $PY has no numpy: skip"
	exit 77
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/moe-run-test.XXXXXX")
trap 'rm -rf "$tmp"' EXIT INT TERM

if "$oracle" --help 2>&1 | grep -q -- --kv-f32; then
	okv=--kv-f32 rkv= f32tol="--tol 1e-5"
else
	okv= rkv=--kv-f16 f32tol="--tol 2e-4 --median-tol 1e-5"
fi
toks=1,5,9,3,17,33,2,8,60,12,7,7,40,21,63,4,11,30,45,6,19,50,27,14
fail=0
for arch in qwen3_moe qwen2_moe olmoe mixtral; do
	# llama.cpp's olmoe graph sizes attn_k_norm by n_embd: no GQA there
	case $arch in
	olmoe) geo="--heads 4 --kv-heads 4 --head-dim 16" ;;
	*) geo="--heads 4 --kv-heads 2 --head-dim 16" ;;
	esac
	for dt in f32 q8_0; do
		o=$tmp/$arch-$dt
		case $dt in
		f32) dokv=$okv drkv=$rkv ;;
		*) dokv= drkv=--kv-f16 ;;
		esac
		# shellcheck disable=SC2086
		"$B/tools/moe-gen" model --family "$arch" --format gguf --dtype "$dt" --preset tiny $geo --seed 7 \
			--out "$o" >/dev/null
		"$B/tools/moe-pack" convert "$o/model.gguf" -o "$o.moepack" -q
		# shellcheck disable=SC2086
		"$oracle" logits "$o/model.gguf" --flash-attn off $dokv --tokens "$toks" --out "$o.ref" 2>"$o.oracle.log" || {
			cat "$o.oracle.log" >&2
			exit 1
		}
		# shellcheck disable=SC2086
		"$B/moe-run" "$o.moepack" --local $drkv --tokens "$toks" --dump-logits "$o.lg" --quiet
		case $dt in
		f32) tol=$f32tol ;;
		*) tol="--tol 2e-2 --median-tol 1e-4" ;;
		esac
		printf '%s %s: ' "$arch" "$dt"
		# shellcheck disable=SC2086
		$PY "$S/tests/logits-compare.py" "$o.lg" "$o.ref" $tol || fail=1
		# the same bits one token at a time (decode path) and on 2 threads
		# (every product split, however small)
		# shellcheck disable=SC2086
		MOETIER_RUN_SPLIT_MIN=0 "$B/moe-run" "$o.moepack" --local $drkv --tokens "$toks" --dump-logits "$o.b1" \
			--batch 1 -t 2 --quiet
		if ! cmp -s "$o.lg" "$o.b1"; then
			echo "test_moe_run: $arch $dt: --batch 1 -t 2 logits differ from the batched prefill" >&2
			fail=1
		fi
		# a prompt of 8 then 16 ids fed one decode step each (--feed, the
		# bench's mode): the same rows, on 2 threads with the default split
		# shellcheck disable=SC2086
		"$B/moe-run" "$o.moepack" --local $drkv --tokens "${toks%%,60,*}" --feed "60,${toks#*,8,60,}" \
			--dump-logits "$o.f" -t 2 2>"$o.f.err"
		if ! cmp -s "$o.lg" "$o.f" || ! grep -q '^moe-run: bench .* n_prefill=8 n_decode=16 ' "$o.f.err"; then
			echo "test_moe_run: $arch $dt: --tokens 8 --feed 16 differs from the batched prefill:" >&2
			cat "$o.f.err" >&2
			fail=1
		fi
	done
done

# greedy decode of 64 tokens: the same ids as llama.cpp (F32, tiny-lm: a
# model with a vocabulary, prompt tokenized by llama.cpp)
for arch in qwen3_moe qwen2_moe olmoe mixtral; do
	o=$tmp/lm-$arch
	"$B/tools/moe-gen" model --family "$arch" --format gguf --dtype f32 --preset tiny-lm --out "$o" >/dev/null
	"$B/tools/moe-pack" convert "$o/model.gguf" -o "$o.moepack" -q
	ids=$("$oracle" tokenize "$o/model.gguf" "The quick brown fox" 2>/dev/null)
	# shellcheck disable=SC2086
	want=$("$oracle" greedy "$o/model.gguf" $okv --tokens "$ids" -n 64 2>/dev/null)
	# shellcheck disable=SC2086
	got=$("$B/moe-run" "$o.moepack" --local $rkv --tokens "$ids" -n 64 --ids --quiet)
	if [ "$got" = "$want" ] && [ -n "$got" ]; then
		echo "$arch: greedy 64 tokens as llama.cpp"
	else
		printf 'test_moe_run: %s: greedy decode differs from llama.cpp\n ours:  %s\n llama: %s\n' "$arch" "$got" \
			"$want" >&2
		fail=1
	fi
done

# --ppl against perplexity computed here from llama.cpp's logits of the same
# chunks (llama.cpp's tokenizer, no BOS): equal within 1e-4 relative (F32;
# the per-row logit differences above are ~1e-6)
o=$tmp/lm-qwen3_moe
cat >"$tmp/ppl.txt" <<'TEXT'
The quick brown fox jumps over the lazy dog. Debian is a free operating system,
developed by thousands of volunteers from all over the world who collaborate via
the Internet. It comes with over 59000 packages, precompiled software bundled in
a nice format for easy installation on your machine.
TEXT
# shellcheck disable=SC2086
ours=$("$B/moe-run" "$o.moepack" --local $rkv --ppl "$tmp/ppl.txt" --ctx 16 --quiet)
ids=$("$oracle" tokenize "$o/model.gguf" --no-special --file "$tmp/ppl.txt" 2>/dev/null)
# shellcheck disable=SC2086
if ! $PY - "$oracle" "$o/model.gguf" "$ids" "$tmp" "$ours" $okv <<'PY'
import math, subprocess, sys
import numpy as np
oracle, model, ids, tmp, ours = sys.argv[1:6]
extra = sys.argv[6:]
ids = [int(t) for t in ids.split(",") if t]
ctx = 16
nll, n, chunks = 0.0, 0, len(ids) // ctx
for c in range(chunks):
    t = ids[c * ctx:(c + 1) * ctx]
    out = f"{tmp}/ppl-{c}.lgt"
    subprocess.run([oracle, "logits", model, "--flash-attn", "off", *extra, "--tokens",
                    ",".join(map(str, t)), "--out", out], check=True, stderr=subprocess.DEVNULL)
    b = open(out, "rb").read()
    nt, nv = np.frombuffer(b[8:16], "<u4")
    z = np.frombuffer(b[16:], "<f4").reshape(nt, nv).astype(np.float64)
    for i in range(ctx - 1):
        m = z[i].max()
        nll -= z[i][t[i + 1]] - m - math.log(np.exp(z[i] - m).sum())
        n += 1
want = math.exp(nll / n)
got = float(ours.split()[1])
ok = f"over {n} tokens ({chunks} chunks of {ctx})" in ours and abs(got - want) <= 1e-4 * want
print(f"ppl: moe-run {ours.strip()!r}, from llama.cpp's logits {want:.4f} over {n} tokens: {'ok' if ok else 'FAIL'}")
sys.exit(0 if ok else 1)
PY
then
	fail=1
fi
exit $fail
