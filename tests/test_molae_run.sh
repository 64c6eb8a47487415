#!/bin/sh
# moe-run on a MoLAE latent pack (issue 15 item 4) against the same model
# reconstructed densely (moe-pack molae --reconstruct: gate = A_gate B,
# up = A_up B): logits within 1e-4 of the row scale (the products are
# associated differently: A (B x) vs (A B) x), the same bits one token at a
# time on 2 threads as batched, and through moetierd (COMPUTE-free: moe-run
# computes the acquired extents with the pack's B) the same bits as --local.
# At full rank (r = hidden) the latent pack computes the original model.
# Also: moe-run --dump-hidden writes the states molae --calib takes.
set -eu
. "$(dirname "$0")/daemon-env.sh"
S=${MOETIER_SRCDIR:-..}
PY=/usr/bin/python3
for p in tools/moe-gen tools/moe-pack moe-run moetierd moe-client; do
	[ -x "$B/$p" ] || { echo "$B/$p not built" >&2; exit 77; }
done
"$B/tools/moe-pack" molae --help 2>&1 | grep -q "not built" && { echo "moe-pack built without LAPACKE"; exit 77; }
$PY -c 'import numpy' 2>/dev/null || { echo "no numpy for logits-compare.py: skip"; exit 77; }
env_init molae-run
toks=1,5,9,3,17,33,2,8,60,12,7,7,40,21,63,4,11,30,45,6,19,50,27,14
"$B/tools/moe-gen" model --family qwen3_moe --format gguf --dtype f32 --preset tiny --heads 4 --kv-heads 2 \
	--head-dim 16 --seed 7 --out "$tmp/src" >/dev/null
"$B/tools/moe-pack" convert "$tmp/src/model.gguf" -o "$tmp/d.moepack" -q
"$B/tools/moe-pack" molae --rank 16 --group-size 4 "$tmp/d.moepack" -o "$tmp/l.moepack" -q >/dev/null
"$B/tools/moe-pack" molae --reconstruct "$tmp/l.moepack" -o "$tmp/r.moepack" -q

if ! "$B/moe-run" "$tmp/l.moepack" --local --tokens "$toks" --dump-logits "$tmp/l.lg" --quiet 2>"$tmp/l.err"; then
	cat "$tmp/l.err" >&2
	echo "FAIL: moe-run refused the latent pack"
	exit 1
fi
fail=0
"$B/moe-run" "$tmp/r.moepack" --local --tokens "$toks" --dump-logits "$tmp/r.lg" --quiet
printf 'latent rank 16 vs its dense reconstruction: '
$PY "$S/tests/logits-compare.py" "$tmp/l.lg" "$tmp/r.lg" --tol 1e-4 --median-tol 1e-5 || fail=1

MOETIER_RUN_SPLIT_MIN=0 "$B/moe-run" "$tmp/l.moepack" --local --tokens "$toks" --dump-logits "$tmp/l1.lg" \
	--batch 1 -t 2 --quiet
cmp -s "$tmp/l.lg" "$tmp/l1.lg" || { echo "FAIL: --batch 1 -t 2 logits differ from the batched prefill"; fail=1; }

# full rank: the latent pack computes the original model
"$B/tools/moe-pack" molae --rank 64 "$tmp/d.moepack" -o "$tmp/f.moepack" -q >/dev/null 2>"$tmp/f.err" ||
	{ cat "$tmp/f.err"; echo "FAIL: full-rank conversion"; exit 1; }
"$B/moe-run" "$tmp/f.moepack" --local --tokens "$toks" --dump-logits "$tmp/f.lg" --quiet
"$B/moe-run" "$tmp/d.moepack" --local --tokens "$toks" --dump-logits "$tmp/d.lg" --quiet
printf 'latent full rank vs the original dense pack: '
$PY "$S/tests/logits-compare.py" "$tmp/f.lg" "$tmp/d.lg" --tol 1e-4 --median-tol 1e-5 || fail=1

# activation-aware: moe-run --dump-hidden gives the calibration states
# [MoE layers][tokens][hidden] f32 that molae --calib takes, and their rows
# are what layer 0 saw (its first row: token 1's ffn_norm'ed embedding, the
# same whatever else ran)
"$B/moe-run" "$tmp/d.moepack" --local --tokens "$toks" --dump-logits "$tmp/h.lg" --dump-hidden "$tmp/h.f32" --quiet
"$B/moe-run" "$tmp/d.moepack" --local --tokens 1 --dump-logits "$tmp/h1.lg" --dump-hidden "$tmp/h1.f32" --quiet
L=$("$B/tools/moe-pack" info "$tmp/d.moepack" | awk '/^layers:/ {sub(/\(/, "", $3); print $3}')
n=$("$B/tools/moe-pack" info "$tmp/d.moepack" | awk '/^hidden:/ {print $2}')
T=$(echo "$toks" | tr ',' '\n' | wc -l)
sz=$(stat -c %s "$tmp/h.f32")
if [ "$sz" -ne $((L * T * n * 4)) ]; then
	echo "FAIL: --dump-hidden wrote $sz bytes, want $L layers x $T tokens x $n x 4"; fail=1
elif ! cmp -s -n $((n * 4)) "$tmp/h.f32" "$tmp/h1.f32"; then
	echo "FAIL: --dump-hidden's first row is not token 1's layer-0 input"; fail=1
elif ! "$B/tools/moe-pack" molae --rank 16 --group-size 4 --calib "$tmp/h.f32" "$tmp/d.moepack" -o "$tmp/c.moepack" -q \
	>/dev/null 2>"$tmp/c.err"; then
	cat "$tmp/c.err"; echo "FAIL: molae --calib refused moe-run's --dump-hidden states"; fail=1
else
	echo "moe-run --dump-hidden: $L x $T x $n states, taken by molae --calib"
fi

# through the daemon: the extents it serves, the same bits as --local
daemon_start moetierd "$tmp/l.moepack" --host-bytes=1M
"$B/moe-run" "$tmp/l.moepack" --socket "$sock" --tokens "$toks" --dump-logits "$tmp/s.lg" --quiet
daemon_stop
cmp -s "$tmp/l.lg" "$tmp/s.lg" || { echo "FAIL: through moetierd the logits differ from --local"; fail=1; }
[ $fail -eq 0 ] && echo ok
exit $fail
