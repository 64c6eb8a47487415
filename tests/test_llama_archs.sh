#!/bin/sh
# The MoE models llama.cpp writes itself: its tests/test-llama-archs.cpp
# (from the bundled source of the npm peer, built here against the npm
# libraries with tests/llama-archs-shim.c, see there) writes one random
# model per architecture (-a ARCH -o DIR: 2 layers, 2 experts, top-1, f32),
# through llama.cpp's own model saver: every hyper-parameter key written
# (expert_feed_forward_length = 0 for llama and olmoe), deepseek2 with a
# dense first layer and sigmoid gating. Two flavours of each:
#  - npm: as the npm build's loader makes them (optional tensors absent:
#    llama's experts have no gate at all, which llama.cpp's build_moe_ffn
#    computes as down(silu(up x)): moe-pack's gateless FFN kind);
#  - upstream: as upstream llama.cpp's loader makes them (MOETIER_ARCHS_
#    UPSTREAM=1): every optional tensor, random - deepseek2's fused
#    ffn_gate_up_exps, ffn_*_exps.scale (per expert) and *.scale (per
#    matrix) that llama.cpp multiplies products by, *.input_scale it
#    ignores, q/k/v biases, llama's attn_output.bias and rope_freqs.
# For qwen3moe, qwen2moe, olmoe, llama and deepseek2 in both: moe-pack
# converts and verifies, and every expert part equals llama.cpp's tensor
# (times its .scale; fused gate/up split in two: tests/pack-vs-gguf.py);
# moe-run's logits of 16 teacher-forced tokens equal llama.cpp's within
# 1e-4 of the row's max |logit| (every family in both flavours: upstream
# llama with rope_freqs and attn_output.bias, npm llama gateless), and
# through moetierd (qwen2moe, deepseek2, gateless llama, whose COMPUTE
# also equals ffn_expert: tests/ffn_compute_check). The fixtures' N(0, 0.01) weights
# leave attention scores near 0 (a uniform softmax: RoPE and kq_scale
# barely reach the logits) and the routed experts' outputs ~1e-9 of the
# residual, so every family runs again from copies where they matter
# (tests/attn-boost.py), deepseek2 also in the forms tests/ds2-variant.py
# derives (heads, kv_b, lite, YaRN, a second MoE layer). What cannot run is refused with a message saying
# why, and checked for it: expert scales on q8_0 experts (upstream
# qwen3moe through tests/llama-quantize), and gated and gateless expert
# layers in one file (upstream llama with one ffn_gate_exps renamed).
# Skips (77) without the llama.cpp peer (source, libraries, tests/llama-
# oracle), a C++ compiler or numpy in Debian's python3.
set -eu
. "$(dirname "$0")/daemon-env.sh"
S=${MOETIER_SRCDIR:-..}
PY=/usr/bin/python3
LL=${MOETIER_LLAMA_DIR:-/var/cache/moetier/llama}

for p in moe-run moetierd moe-client tools/moe-pack tests/ffn_compute_check; do
	[ -x "$B/$p" ] || { echo "test_llama_archs: $B/$p is missing" >&2; exit 1; }
done
skip() { echo "test_llama_archs: $*: skip"; exit 77; }
[ -x "$B/tests/llama-oracle" ] || skip "tests/llama-oracle not built (no llama.cpp)"
[ -r "$LL/src/tests/test-llama-archs.cpp" ] || skip "no $LL/src/tests/test-llama-archs.cpp"
[ -r "$LL/src/gguf-py/gguf/__init__.py" ] || skip "no gguf-py in $LL/src"
command -v g++ >/dev/null 2>&1 || skip "no g++"
$PY -c 'import numpy' 2>/dev/null || skip "$PY has no numpy"
lib=
for d in "$LL/lib" "$LL/node_modules/@node-llama-cpp/linux-x64/bins/linux-x64"; do
	[ -z "$lib" ] && ls "$d"/libllama*.so >/dev/null 2>&1 && lib=$d
done
[ -n "$lib" ] || skip "no llama.cpp libraries in $LL"
so() { ls "$lib/lib$1.so" "$lib/lib$1".v*.so 2>/dev/null | head -n 1; }
libs="$(so llama) $(so llama-common) $(so ggml) $(so ggml-base)"
for f in $libs; do [ -r "$f" ] || skip "llama.cpp library missing in $lib"; done
[ "$(echo $libs | wc -w)" = 4 ] || skip "llama.cpp libraries missing in $lib"

env_init llama-archs
fail=0
bin=$B/tests/test-llama-archs
# built once per source change (a minute of g++), kept in the build tree
if [ ! -x "$bin" ] || [ "$S/tests/llama-archs-shim.c" -nt "$bin" ] || [ "$LL/src/tests/test-llama-archs.cpp" -nt "$bin" ]
then
	inc="-I$LL/src/include -I$LL/src/ggml/include -I$LL/src/common -I$LL/src/src -I$LL/src/vendor"
	gcc -c -O1 -I"$LL/src/include" -I"$LL/src/ggml/include" "$S/tests/llama-archs-shim.c" -o "$tmp/shim.o"
	# shellcheck disable=SC2086
	g++ -std=c++17 -O1 -w $inc "$LL/src/tests/test-llama-archs.cpp" "$tmp/shim.o" -o "$tmp/tla" $libs -ldl \
		-Wl,-rpath,"$lib" -Wl,--export-dynamic-symbol=_ZNK18llama_model_loader20done_getting_tensorsEb \
		-Wl,--export-dynamic-symbol=gguf_find_tensor -Wl,--export-dynamic-symbol=gguf_get_tensor_type \
		2>"$tmp/cxx.log" || { cat "$tmp/cxx.log" >&2; echo "test_llama_archs: cannot build test-llama-archs" >&2; exit 1; }
	mv "$tmp/tla" "$bin"
fi
export MOETIER_LLAMA_BACKEND_DIR="$lib"

gen() { # flavour arch [omit]
	mkdir -p "$tmp/$1"
	if ! MOETIER_ARCHS_UPSTREAM=$([ "$1" = npm ] && echo 0 || echo 1) MOETIER_ARCHS_OMIT=${3:-} \
		timeout 120 "$bin" -a "$2" -o "$tmp/$1" -s 1 >"$tmp/gen.log" 2>&1 || [ ! -s "$tmp/$1/$2-moe.gguf" ]; then
		echo "test_llama_archs: test-llama-archs -a $2 ($1) failed:" >&2
		cat "$tmp/gen.log" >&2
		exit 1
	fi
}

toks=1,5,9,3,17,33,2,8,60,12,7,7,40,21,63,4
ok() { echo "$*"; }
bad() { echo "test_llama_archs: $*" >&2; fail=1; }

pack() { # flavour arch: convert, verify, parts against the GGUF
	g=$tmp/$1/$2-moe.gguf p=$tmp/$1-$2.moepack
	"$B/tools/moe-pack" convert "$g" -o "$p" -q 2>"$tmp/conv.err" || { cat "$tmp/conv.err" >&2; bad "$1 $2: convert"; return 1; }
	"$B/tools/moe-pack" verify "$p" >"$tmp/verify.out" 2>&1 || { cat "$tmp/verify.out" >&2; bad "$1 $2: verify"; return 1; }
	printf '%s %s: ' "$1" "$2"
	$PY "$S/tests/pack-vs-gguf.py" "$p" "$g" "$LL/src/gguf-py" || { bad "$1 $2: parts differ"; return 1; }
}

boost() { # flavour arch: $tmp/b<flavour>/<arch>-moe.gguf, its attention scaled up
	mkdir -p "$tmp/b$1"
	$PY "$S/tests/attn-boost.py" "$tmp/$1/$2-moe.gguf" "$tmp/b$1/$2-moe.gguf" "$LL/src/gguf-py" >/dev/null ||
		{ bad "$1 $2: attn-boost"; return 1; }
}

logits() { # flavour arch [extra moe-run args]: moe-run against llama.cpp
	f=$1 a=$2
	shift 2
	"$B/tests/llama-oracle" logits "$tmp/$f/$a-moe.gguf" --flash-attn off --kv-f32 --tokens "$toks" \
		--out "$tmp/$f-$a.ref" 2>"$tmp/o.log" || { cat "$tmp/o.log" >&2; bad "$f $a: llama.cpp"; return 1; }
	"$B/moe-run" "$tmp/$f-$a.moepack" "$@" --tokens "$toks" --dump-logits "$tmp/$f-$a.lg" --quiet \
		2>"$tmp/run.err" || { cat "$tmp/run.err" >&2; bad "$f $a: moe-run"; return 1; }
	printf '%s %s moe-run %s: ' "$f" "$a" "$*"
	$PY "$S/tests/logits-compare.py" "$tmp/$f-$a.lg" "$tmp/$f-$a.ref" --tol 1e-4 || bad "$f $a: logits"
}

refused() { # what command... : fails, with `what` in its stderr
	what=$1
	shift
	if "$@" >/dev/null 2>"$tmp/ref.err"; then
		bad "accepted (expected a refusal saying '$what'): $*"
	elif ! grep -q -- "$what" "$tmp/ref.err"; then
		cat "$tmp/ref.err" >&2
		bad "refused without saying '$what': $*"
	else
		ok "refused as expected: $(cat "$tmp/ref.err")"
	fi
}

for f in npm upstream; do
	for a in qwen3moe qwen2moe olmoe llama deepseek2; do
		gen $f $a
	done
	for a in qwen3moe qwen2moe olmoe deepseek2; do
		pack $f $a && logits $f $a --local
	done
done

# every family again with its routed experts (and deepseek2's and llama's
# attention) mattering. The upstream ones carry ffn_*_exps.scale: qwen3moe's
# (and llama's) graph multiplies the experts by them, qwen2moe's, olmoe's and
# deepseek2's ignore them, and so must moe-pack.
for a in qwen3moe qwen2moe olmoe deepseek2; do
	boost npm $a && pack bnpm $a && logits bnpm $a --local
	boost upstream $a && pack bupstream $a && logits bupstream $a --local
done
for a in qwen2moe olmoe deepseek2; do
	gen noscale $a exps.scale
	boost noscale $a && pack bnoscale $a && logits bnoscale $a --local
done
# the MLA paths the fixture leaves out (tests/ds2-variant.py): several
# heads (3-D attn_k_b / attn_v_b), the legacy attn_kv_b, no q LoRA, YaRN
# (factor 4, DeepSeek-V2's yarn_log_multiplier 0.0707), a second MoE layer
# routing with its own exp_probs_b
variant() { # name source-flavour options...
	n=$1 src=$2
	shift 2
	mkdir -p "$tmp/$n"
	$PY "$S/tests/ds2-variant.py" "$tmp/$src/deepseek2-moe.gguf" "$tmp/$n/deepseek2-moe.gguf" "$LL/src/gguf-py" "$@" ||
		{ bad "deepseek2 variant $n ($*)"; return 1; }
	boost $n deepseek2 && pack b$n deepseek2 && logits b$n deepseek2 --local
}
variant heads npm --heads 3
variant kvb npm --heads 2 --kv-b
variant lite npm --heads 2 --lite
variant yarn npm --heads 2 --yarn 4 0.0707
variant moe2 noscale --moe-layer

# a scale llama.cpp applies cannot be folded into quantized experts
if [ -x "$B/tests/llama-quantize" ]; then
	"$B/tests/llama-quantize" "$tmp/upstream/qwen3moe-moe.gguf" "$tmp/q8s.gguf" Q8_0 2>"$tmp/quant.log" ||
		{ cat "$tmp/quant.log" >&2; exit 1; }
	refused "ffn_gate_exps.scale: expert 0's scale is" \
		"$B/tools/moe-pack" convert "$tmp/q8s.gguf" -o "$tmp/q8s.moepack" -q
	grep -q "folds such scales into f32 weights only (blk.0.ffn_gate_exps.weight is q8_0)" "$tmp/ref.err" ||
		bad "the refusal does not name the expert tensor's type"
fi

# llama (Mixtral layout). npm: experts without ffn_gate_exps, which
# llama.cpp computes as down(silu(up x)): a gateless pack (up and down
# parts only, FFN kind silu), decoded with llama.cpp's logits, and again
# with the experts boosted (where a wrong activation shows)
if pack npm llama; then
	"$B/tools/moe-pack" info "$tmp/npm-llama.moepack" >"$tmp/info.out" 2>&1 || bad "npm llama: info"
	if grep -q '^  gate ' "$tmp/info.out" || ! grep -q '^  up ' "$tmp/info.out"; then
		cat "$tmp/info.out" >&2
		bad "npm llama: the pack's parts are not up and down alone"
	fi
	grep -q '^ffn: *silu (gateless' "$tmp/info.out" || bad "npm llama: moe-pack info does not say the experts are gateless"
	logits npm llama --local
fi
boost npm llama && pack bnpm llama && logits bnpm llama --local
# a pack's experts are all gated or all gateless: upstream llama with
# layer 1's ffn_gate_exps renamed away (same length, in place) is refused
$PY -c 'import sys
d = open(sys.argv[1], "rb").read()
a, b = b"blk.1.ffn_gate_exps.weight", b"blk.1.ffn_gatx_exps.weight"
assert d.count(a) == 1
open(sys.argv[2], "wb").write(d.replace(a, b))' "$tmp/upstream/llama-moe.gguf" "$tmp/mixed.gguf" ||
	bad "cannot rename blk.1.ffn_gate_exps"
refused "blk.1's experts have no gate and blk.0's do" \
	"$B/tools/moe-pack" convert "$tmp/mixed.gguf" -o "$tmp/mixed.moepack" -q
[ ! -e "$tmp/mixed.moepack" ] || bad "a refused conversion left $tmp/mixed.moepack"
# upstream: rope_freqs (llama.cpp's freq_factors) and attn_output.bias
pack upstream llama && logits upstream llama --local
boost upstream llama && pack bupstream llama && logits bupstream llama --local

# through moetierd: one pack's experts from a host arena of 2 extents
daemon_start moetierd "$tmp/upstream-qwen2moe.moepack" --host-bytes=2M --gpu-bytes=0
"$B/moe-run" "$tmp/upstream-qwen2moe.moepack" --socket "$sock" --tokens "$toks" --dump-logits "$tmp/d.lg" \
	2>"$tmp/d.err" || { cat "$tmp/d.err" >&2; bad "moe-run through moetierd"; }
if cmp -s "$tmp/d.lg" "$tmp/upstream-qwen2moe.lg"; then
	ok "moetierd: upstream qwen2moe's logits through the daemon equal --local's"
else
	bad "upstream qwen2moe's logits through moetierd differ from --local"
fi
daemon_stop
# the gateless llama through the daemon: COMPUTE equals ffn_expert on the
# pack's extents, and moe-run's logits equal --local's
daemon_start moetierd "$tmp/bnpm-llama.moepack" --host-bytes=2M --gpu-bytes=0
"$B/tests/ffn_compute_check" "$sock" "$tmp/bnpm-llama.moepack" || bad "gateless llama: COMPUTE through moetierd"
"$B/moe-run" "$tmp/bnpm-llama.moepack" --socket "$sock" --tokens "$toks" --dump-logits "$tmp/dl.lg" \
	2>"$tmp/dl.err" || { cat "$tmp/dl.err" >&2; bad "gateless llama: moe-run through moetierd"; }
if cmp -s "$tmp/dl.lg" "$tmp/bnpm-llama.lg"; then
	ok "moetierd: the gateless npm llama's logits through the daemon equal --local's"
else
	bad "the gateless npm llama's logits through moetierd differ from --local"
fi
daemon_stop
# deepseek2: decoded through the daemon (a dense first layer, the MoE
# layer's experts from the arena), served and routed by it (sigmoid scores)
daemon_start moetierd "$tmp/upstream-deepseek2.moepack" --host-bytes=2M --gpu-bytes=0
"$B/moe-run" "$tmp/upstream-deepseek2.moepack" --socket "$sock" --tokens "$toks" --dump-logits "$tmp/d2.lg" \
	2>"$tmp/d2.err" || { cat "$tmp/d2.err" >&2; bad "deepseek2: moe-run through moetierd"; }
if cmp -s "$tmp/d2.lg" "$tmp/upstream-deepseek2.lg"; then
	ok "moetierd: upstream deepseek2's logits through the daemon equal --local's"
else
	bad "upstream deepseek2's logits through moetierd differ from --local"
fi
"$B/moe-client" --socket "$sock" route 0 -0.5 0.25 >"$tmp/route.out" 2>&1 || { cat "$tmp/route.out" >&2; bad "route"; }
# top-1 of sigmoid(-0.5), sigmoid(0.25): expert 1, weight sigmoid(0.25)
# (llama.cpp's deepseek2: no renormalisation, no scale when the keys say 0)
if grep -q 'expert 1 .*weight 0\.5621' "$tmp/route.out"; then
	ok "moetierd serves upstream deepseek2: $(tr '\n' ' ' <"$tmp/route.out")"
else
	cat "$tmp/route.out" >&2
	bad "moetierd did not route deepseek2's logits (-0.5, 0.25) to expert 1 with weight 0.5622"
fi
daemon_stop
exit $fail
