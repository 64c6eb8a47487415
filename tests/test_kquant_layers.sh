#!/bin/sh
# Expert types that differ between layers, as the GGUFs people download
# have them: llama.cpp's plain Q4_K_M gives ffn_down_exps q6_K in some
# layers only (use_more_bits: here layer 2 of 3), and a --tensor override
# of layer 0's ffn_gate_exps and ffn_up_exps (q5_K) makes a third kind. A moe-gen
# qwen3_moe tiny-lm model (f32, hidden and expert width 256) quantized by
# llama.cpp's llama_model_quantize (tests/llama-quantize). Checks:
#  - moe-pack converts both files and the split parts of the first one
#    (same pack), writes a version 2 pack whose header holds one part
#    table per kind of layer and maps each MoE layer to the GGUF's own
#    types (read here from the bytes, by doc/pack-format.md's offsets);
#  - moe-pack verify passes, and a byte flipped in the zero tail of a
#    smaller layer's extent is found;
#  - llama.cpp reads the same files; moe-run's logits (--local, and
#    through moetierd with a host arena of 8 extents sized by the largest
#    layout) equal llama.cpp's within test_kquant_e2e.sh's tolerances. A
#    moe-run built before client/run/experts.c computes each layer with
#    model_layout() refuses such a pack with a message saying so; that
#    refusal is checked instead of the logits (and said on stdout).
# Skips (77) without the llama.cpp peer (tests/llama-quantize and
# tests/llama-oracle not built) or without numpy in Debian's python3.
set -eu
. "$(dirname "$0")/daemon-env.sh"
. "$(dirname "$0")/kquant-env.sh"
kquant_init test_kquant_layers kquant-layers
# q4m: plain Q4_K_M (layers 0, 1: q4_K down; layer 2: q6_K down)
kquant_quantize "$tmp/f/model.gguf" "$tmp/q4m.gguf" Q4_K_M
# q4m3: the same with layer 0's gate and up in q5_K: three kinds of layer
kquant_quantize --tensor 'blk\.0\.ffn_(gate|up)_exps=Q5_K' "$tmp/f/model.gguf" "$tmp/q4m3.gguf" Q4_K_M

# the layouts in the header, by the documented offsets: per MoE layer
# "gate/up/down" dtype names, and the header's version and payloads
layouts() {
	$PY - "$1" <<'PY'
import struct, sys
b = open(sys.argv[1], "rb").read(4096)
names = {1: "f32", 2: "f16", 3: "bf16", 4: "q8_0", 5: "q4_0", 12: "q4_K", 13: "q5_K", 14: "q6_K"}
ver, = struct.unpack_from("<I", b, 8)
n_moe, = struct.unpack_from("<I", b, 24 + 64 + 7 * 4)
n_parts, = struct.unpack_from("<I", b, 340)
payload, = struct.unpack_from("<Q", b, 608)
n_layouts, = struct.unpack_from("<I", b, 752)
out = []
for l in range(n_moe):
    k = b[2936 + l]
    base = 760 + 272 * k
    np_, _, pl = struct.unpack_from("<IIQ", b, base)
    parts = [struct.unpack_from("<IIIIQQ", b, base + 16 + 32 * i) for i in range(np_)]
    out.append("/".join(names.get(p[1], str(p[1])) for p in parts) + f"@{pl}")
print(f"v{ver} n_parts={n_parts} layouts={n_layouts} payload={payload} " + " ".join(out))
PY
}

check_layouts() { # file want
	got=$(layouts "$1")
	if [ "$got" = "$2" ]; then
		echo "$(basename "$1"): $got"
	else
		printf 'test_kquant_layers: %s has layouts\n  %s\nexpected\n  %s\n' "$1" "$got" "$2" >&2
		fail=1
	fi
}

# q4_K [256 x 256] = 36864 bytes, q5_K 45056, q6_K 53760
"$B/tools/moe-pack" convert "$tmp/q4m.gguf" -o "$tmp/q4m.moepack" -q
check_layouts "$tmp/q4m.moepack" \
	"v2 n_parts=0 layouts=2 payload=127488 q4_K/q4_K/q4_K@110592 q4_K/q4_K/q4_K@110592 q4_K/q4_K/q6_K@127488"
"$B/tools/moe-pack" convert "$tmp/q4m3.gguf" -o "$tmp/q4m3.moepack" -q
check_layouts "$tmp/q4m3.moepack" \
	"v2 n_parts=0 layouts=3 payload=127488 q5_K/q5_K/q4_K@126976 q4_K/q4_K/q4_K@110592 q4_K/q4_K/q6_K@127488"
"$B/tools/moe-pack" info "$tmp/q4m.moepack" | grep -q '^format: *moepack v2, from gguf' ||
	{ echo "test_kquant_layers: moe-pack info does not say v2" >&2; fail=1; }
# info lists each layer group's types (the down part of the last layer is q6_K)
"$B/tools/moe-pack" info "$tmp/q4m.moepack" | awk '/^parts of MoE layers/ {n++} /^  down +q6_K/ {d++} END {exit !(n == 2 && d == 1)}' ||
	{ echo "test_kquant_layers: moe-pack info does not list the per-layer parts" >&2; fail=1; }
"$B/tools/moe-pack" info --json "$tmp/q4m.moepack" | /usr/bin/python3 -c '
import json, sys
o = json.load(sys.stdin)
t = [[p["dtype"] for p in l["parts"]] for l in o["layouts"]]
sys.exit(0 if len(t) == 2 and ["q4_K", "q4_K", "q6_K"] in t and sum(len(l["layers"]) for l in o["layouts"]) == o["model"]["n_moe_layers"] else 1)' ||
	{ echo "test_kquant_layers: moe-pack info --json has no right layouts array" >&2; fail=1; }
mkdir "$tmp/s"
"$B/tests/gguf-split" --split 3 "$tmp/q4m.gguf" "$tmp/s/q"
"$B/tools/moe-pack" convert "$tmp/s/q-00001-of-00003.gguf" -o "$tmp/q4ms.moepack" -q
if cmp -s "$tmp/q4ms.moepack" "$tmp/q4m.moepack"; then
	echo "moe-pack: the split parts' pack equals the unsplit file's"
else
	echo "test_kquant_layers: the split parts' pack differs from the unsplit file's" >&2
	fail=1
fi
LL=${MOETIER_LLAMA_DIR:-/var/cache/moetier/llama}
for p in q4m q4m3; do
	"$B/tools/moe-pack" verify "$tmp/$p.moepack" >"$tmp/verify.out" ||
		{ cat "$tmp/verify.out" >&2; fail=1; }
	# every part of every expert is the GGUF's slab (read with llama.cpp's gguf-py)
	if [ -r "$LL/src/gguf-py/gguf/__init__.py" ]; then
		printf '%s: ' "$p"
		$PY "$S/tests/pack-vs-gguf.py" "$tmp/$p.moepack" "$tmp/$p.gguf" "$LL/src/gguf-py" || fail=1
	fi
done

# a flipped byte in the zero tail of a layer-0 extent (110592 < 127488)
cp "$tmp/q4m.moepack" "$tmp/bad.moepack"
$PY - "$tmp/bad.moepack" <<'PY'
import struct, sys
f = open(sys.argv[1], "r+b")
b = f.read(4096)
index_offset, = struct.unpack_from("<Q", b, 624)
f.seek(index_offset + 32 * 3)
off, = struct.unpack("<Q", f.read(8))   # MoE layer 0 expert 3
f.seek(off + 110592 + 7)
f.write(b"\x01")
PY
if "$B/tools/moe-pack" verify "$tmp/bad.moepack" >"$tmp/verify.out" 2>&1; then
	echo "test_kquant_layers: moe-pack verify passed a flipped byte in an extent's zero tail" >&2
	fail=1
elif ! grep -q 'layer 0 (model layer 0) expert 3' "$tmp/verify.out"; then
	echo "test_kquant_layers: verify did not name layer 0 expert 3:" >&2
	cat "$tmp/verify.out" >&2
	fail=1
fi

per_layer=1
for p in q4m q4m3; do
	kquant_oracle_logits "$tmp/$p.gguf" "$tmp/$p.ref"
	if ! "$B/moe-run" "$tmp/$p.moepack" --local --kv-f16 --tokens "$toks" --dump-logits "$tmp/$p.lg" --quiet \
		2>"$tmp/run.err"; then
		if grep -q "computes every layer with layer 0's layout" "$tmp/run.err"; then
			per_layer=0
			echo "moe-run: refuses $p (this build computes one layout for all layers: client/run/experts.c)"
			continue
		fi
		cat "$tmp/run.err" >&2
		fail=1
		continue
	fi
	printf 'qwen3_moe %s: ' "$p"
	$PY "$S/tests/logits-compare.py" "$tmp/$p.lg" "$tmp/$p.ref" --tol 2e-2 --median-tol 1e-4 || fail=1
	head_rows "$tmp/$p.lg" "$tmp/$p.ref" || fail=1
done

# through the daemon: slots sized by the largest layout (8 of 48 extents)
if [ $per_layer = 1 ]; then
	kquant_through_daemon "$tmp/q4m3.moepack" "$tmp/q4m3.lg" 1280K "1.25 MiB"
else
	daemon_start moetierd "$tmp/q4m3.moepack" --host-bytes=1280K --gpu-bytes=0
	daemon_stop
fi
exit $fail
