# tests/kquant-env.sh - sourced by the K-quant tests against llama.cpp
# (test_kquant_e2e.sh, test_kquant_layers.sh), after tests/daemon-env.sh:
#   . "$(dirname "$0")/daemon-env.sh"; . "$(dirname "$0")/kquant-env.sh"
#   kquant_init NAME TMPNAME
# kquant_init checks the programs (a missing one of ours fails; no llama.cpp
# peer or no numpy in Debian's python3 skips, 77), makes the temporary
# directory (env_init TMPNAME) and the f32 model both quantize: a moe-gen qwen3_moe
# tiny-lm, hidden and expert width 256 so that every matrix takes 256-element
# super-blocks, in $tmp/f/model.gguf. Sets name (NAME, for messages), S, PY, fail=0, oracle (tests/
# llama-oracle) and toks (the 24 teacher-forced tokens).

kquant_init() {
	name=$1
	S=${MOETIER_SRCDIR:-..}
	PY=/usr/bin/python3
	for p in moe-run moetierd moe-client tools/moe-gen tools/moe-pack tests/gguf-split; do
		[ -x "$B/$p" ] || { echo "$name: $B/$p is missing" >&2; exit 1; }
	done
	if [ ! -x "$B/tests/llama-quantize" ] || [ ! -x "$B/tests/llama-oracle" ]; then
		echo "$name: tests/llama-quantize or llama-oracle not built (no llama.cpp): skip"
		exit 77
	fi
	if ! $PY -c 'import numpy' 2>/dev/null; then
		echo "$name: $PY has no numpy: skip"
		exit 77
	fi
	env_init "$2"
	fail=0
	oracle=$B/tests/llama-oracle
	toks=1,5,9,3,17,33,2,8,60,12,7,7,40,21,63,4,11,30,45,6,19,50,27,14
	"$B/tools/moe-gen" model --family qwen3_moe --preset tiny-lm --format gguf --dtype f32 --hidden 256 \
		--width 256 --out "$tmp/f" >/dev/null
}

# kquant_quantize ARGS...: tests/llama-quantize ARGS (llama.cpp's
# llama_model_quantize); its log only when it fails, which ends the test.
kquant_quantize() {
	"$B/tests/llama-quantize" "$@" 2>"$tmp/quant.log" || { cat "$tmp/quant.log" >&2; exit 1; }
}

# kquant_oracle_logits GGUF OUT: llama.cpp's logits of $toks (no flash
# attention, its f16 KV cache); its log only when it fails, which ends the test.
kquant_oracle_logits() {
	"$oracle" logits "$1" --flash-attn off --tokens "$toks" --out "$2" 2>"$tmp/o.log" ||
		{ cat "$tmp/o.log" >&2; exit 1; }
}

# head_rows OURS REF: rows 0..2 of two logits dumps within 1e-5 (relative to
# the row's max |logit|), before any rounding-boundary flip can have spread.
head_rows() {
	$PY - "$1" "$2" <<'PY'
import sys
import numpy as np
def rd(p):
    b = open(p, "rb").read()
    n, v = np.frombuffer(b[8:16], dtype="<u4")
    return np.frombuffer(b[16:], dtype="<f4").reshape(n, v)
a, r = rd(sys.argv[1]), rd(sys.argv[2])
e = [float(np.abs(a[i] - r[i]).max() / np.abs(r[i]).max()) for i in range(3)]
print("first 3 rows: " + " ".join(f"{x:.1e}" for x in e) + (" ok" if max(e) <= 1e-5 else " FAIL (tol 1e-5)"))
sys.exit(0 if max(e) <= 1e-5 else 1)
PY
}

# kquant_through_daemon PACK LOCAL_LOGITS HOST_BYTES WHAT: moe-run through a
# moetierd serving PACK from a host arena of HOST_BYTES (WHAT, in words)
# gives LOCAL_LOGITS' bits, with misses (else the arena tiered nothing, as
# test_moe_run_daemon checks); the daemon must then stop cleanly.
kquant_through_daemon() {
	daemon_start moetierd "$1" --host-bytes="$3" --gpu-bytes=0
	"$B/moe-run" "$1" --socket "$sock" --kv-f16 --tokens "$toks" --dump-logits "$tmp/lgd" 2>"$tmp/d.err" ||
		{ cat "$tmp/d.err" >&2; exit 1; }
	if cmp -s "$2" "$tmp/lgd"; then
		echo "moetierd: moe-run's logits through a $4 host arena equal --local's"
	else
		echo "$name: logits through moetierd differ from --local" >&2
		fail=1
	fi
	if ! grep -q 'missed [1-9]' "$tmp/d.err" && ! grep -q 'missed 0\.[0-9]*[1-9]' "$tmp/d.err"; then
		echo "$name: no misses through moetierd: the arena tiered nothing" >&2
		cat "$tmp/d.err" >&2
		fail=1
	fi
	daemon_stop
}
