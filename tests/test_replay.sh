#!/bin/sh
# moe-client info names every capability; replay maps a trace's layer ids (model layer indices) onto the
# model's MoE layers: a trace whose first layer id is 6 lands on MoE layer 5
# of a model whose first MoE layer is 1 (it once landed on MoE layer 0), and
# a trace naming a layer without routed experts is refused, exit non-zero.
set -eu
. "$(dirname "$0")/daemon-env.sh"
for p in tools/moe-gen tools/moe-pack moetierd moe-client moectl; do
	[ -x "$B/$p" ] || { echo "test_replay: $B/$p not built" >&2; exit 77; }
done
env_init replay

# DeepSeek-V2 shape: layer 0 dense, MoE layers 1..6 (MoE index 0..5).
"$B/tools/moe-gen" model --family deepseek_v2 --preset tiny --experts 16 --top-k 2 --layers 7 \
	--out "$tmp/src" >/dev/null
"$B/tools/moe-pack" convert "$tmp/src" -o "$tmp/m.moepack" --name rp -q
"$B/tools/moe-gen" trace --tokens 20 --layers 1 --first-layer 6 --experts 16 --top-k 2 --seed 3 \
	--out "$tmp/l6.csv" >/dev/null
"$B/tools/moe-gen" trace --tokens 5 --layers 2 --first-layer 0 --experts 16 --top-k 2 --seed 4 \
	--out "$tmp/l0.csv" >/dev/null
daemon_start moetierd "$tmp/m.moepack" --host-bytes=16M
# info names every capability the daemon grants (compute was once left out)
"$B/moe-client" --socket "$sock" info | tee "$tmp/info"
grep -q '^capabilities:.* route compute' "$tmp/info" || { echo "FAIL: info does not show compute"; exit 1; }
"$B/moe-client" --socket "$sock" replay --brief "$tmp/l6.csv"
"$B/moectl" --socket "$sock" stats --json >"$tmp/s.json"
python3 - "$tmp/s.json" <<'PY'
import json, sys
m = next(iter(json.load(open(sys.argv[1]))["models"].values()))
ex = m["experts"]
per_layer = [sum(ex["hits"][l]) + sum(ex["misses"][l]) for l in range(ex["layers"])]
print("lookups per MoE layer:", per_layer)
assert per_layer[5] >= 40, "trace layer 6 should land on MoE layer 5 (20 tokens x top-2, misses counted again when waited for)"
assert sum(per_layer) == per_layer[5], "lookups landed on other MoE layers"
PY
# moectl says what a failed unpin / evict means (not "No such file or directory")
rc=0
"$B/moectl" --socket "$sock" unpin 0 1 2>"$tmp/err" || rc=$?
cat "$tmp/err"
[ $rc -ne 0 ] && grep -q 'layer 0 expert 1: not pinned on the host tier' "$tmp/err" ||
	{ echo "FAIL: unpin of an unpinned expert: rc=$rc"; exit 1; }
rc=0
"$B/moectl" --socket "$sock" evict 0 2 --tier gpu 2>"$tmp/err" || rc=$?
cat "$tmp/err"
[ $rc -ne 0 ] && grep -q 'not resident on the GPU tier\|no GPU tier' "$tmp/err" ||
	{ echo "FAIL: evict of an absent expert: rc=$rc"; exit 1; }
rc=0
"$B/moe-client" --socket "$sock" replay --brief "$tmp/l0.csv" 2>"$tmp/err" || rc=$?
cat "$tmp/err"
[ $rc -ne 0 ] || { echo "FAIL: a trace naming dense layer 0 replayed without error"; exit 1; }
grep -q "layer 0 has no routed experts" "$tmp/err" || { echo "FAIL: no clear error"; exit 1; }
echo "ok"
