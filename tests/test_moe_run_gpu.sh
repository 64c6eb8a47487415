#!/bin/sh
# moe-run --gpu where no GPU computes (here and in CI; the device path
# itself is tests/moe-run-gpu.sh, run by scripts/gpu-check):
#  - the option: --gpu=auto|on|off, --gpu alone meaning on, a bad value and
#    --gpu=on with --local refused (exit 2);
#  - a daemon without a GPU tier: --gpu=on fails (exit 1) saying so, the
#    default (auto) says in one line why it stays on the host and decodes
#    bit for bit as --gpu=off and --local (teacher-forced logits, greedy ids);
#  - the daemon's emulated GPU tier: --gpu=on fails (not a CUDA tier); auto
#    asks for the GPU tier, computes its experts on the host through
#    moet_slot_ptr, and its logits are bit-identical to --local and to
#    --gpu=off while the summary shows GPU-tier hits (token by token, and
#    batched with prefetch hints to the GPU tier on 2 threads).
set -eu
. "$(dirname "$0")/daemon-env.sh"

for p in moe-run moetierd moe-client tools/moe-gen tools/moe-pack; do
	[ -x "$B/$p" ] || { echo "test_moe_run_gpu: $B/$p is missing" >&2; exit 1; }
done

env_init moe-run-gpu
fail=0
bad() { echo "test_moe_run_gpu: FAIL: $*" >&2; fail=1; }

# 4 MoE layers x 32 experts, top-4; Q8_0 experts of 6.4 KiB in 8 KiB slots
"$B/tools/moe-gen" model --family qwen3_moe --format gguf --dtype q8_0 --preset tiny --heads 4 --kv-heads 2 \
	--head-dim 16 --experts 32 --top-k 4 --layers 4 --seed 5 --out "$tmp/src" >/dev/null
"$B/tools/moe-pack" convert "$tmp/src/model.gguf" -o "$tmp/m.moepack" -q

run() { timeout -k 5 120 "$B/moe-run" "$tmp/m.moepack" "$@"; }
# expect STATUS PATTERN ARGS...: moe-run exits STATUS and says PATTERN
expect() {
	want=$1 pat=$2
	shift 2
	rc=0
	out=$(run "$@" 2>&1) || rc=$?
	[ "$rc" -eq "$want" ] || bad "moe-run $*: exit $rc, want $want: $out"
	echo "$out" | grep -qF -- "$pat" || bad "moe-run $*: no '$pat' in: $out"
}

toks=$(seq -s, 1 48)
expect 2 "--gpu=auto|on|off, not 'maybe'" --local --tokens 1,2 --gpu=maybe
expect 2 "not with --local" --local --tokens 1,2 --gpu=on
expect 2 "not with --local" --local --tokens 1,2 --gpu
run --local --tokens "$toks" --dump-logits "$tmp/local.lg" --quiet
run --local --tokens 1,2,3 -n 12 --ids --quiet >"$tmp/local.ids"
run --local --tokens "$toks" --dump-logits "$tmp/local-off.lg" --gpu=off --quiet
cmp "$tmp/local.lg" "$tmp/local-off.lg" || bad "--local --gpu=off changed the logits"

# 1. no GPU tier
daemon_start moetierd "$tmp/m.moepack" --host-bytes=104K --gpu-bytes=0
expect 1 "--gpu=on: moetierd has no GPU tier" --socket "$sock" --tokens 1,2,3 --gpu=on
run --socket "$sock" --tokens "$toks" --dump-logits "$tmp/off.lg" --batch 1 --gpu=off 2>"$tmp/off.err"
run --socket "$sock" --tokens "$toks" --dump-logits "$tmp/auto.lg" --batch 1 2>"$tmp/auto.err"
run --socket "$sock" --tokens 1,2,3 -n 12 --ids --quiet >"$tmp/auto.ids"
grep -q '^moe-run: GPU: not used (moetierd has no GPU tier' "$tmp/auto.err" ||
	bad "auto without a GPU tier did not say why: $(cat "$tmp/auto.err")"
[ "$(grep -c '^moe-run: GPU' "$tmp/auto.err")" -eq 1 ] || bad "auto: not exactly one GPU line"
! grep -q '^moe-run: GPU' "$tmp/off.err" || bad "--gpu=off printed a GPU line"
cmp "$tmp/off.lg" "$tmp/auto.lg" || bad "no GPU tier: --gpu=auto logits differ from --gpu=off"
cmp "$tmp/local.lg" "$tmp/auto.lg" || bad "no GPU tier: --gpu=auto logits differ from --local"
cmp "$tmp/local.ids" "$tmp/auto.ids" || bad "no GPU tier: greedy ids differ from --local"
daemon_stop

# 2. the emulated GPU tier: 16 GPU slots, 13 host slots, for 128 experts
daemon_start moetierd "$tmp/m.moepack" --host-bytes=104K --gpu-bytes=128K --gpu-backend=emulated
"$B/moe-client" --socket "$sock" info | grep 'GPU arena.*emulated'
expect 1 "GPU tier is emulated" --socket "$sock" --tokens 1,2,3 --gpu=on
run --socket "$sock" --tokens "$toks" --dump-logits "$tmp/emu.lg" --batch 1 2>"$tmp/emu.err"
MOETIER_RUN_SPLIT_MIN=0 run --socket "$sock" --tokens "$toks" --dump-logits "$tmp/emu2.lg" --batch 8 -t 2 \
	--prefetch-depth 2 2>"$tmp/emu2.err"
run --socket "$sock" --tokens "$toks" --dump-logits "$tmp/emu-off.lg" --batch 1 --gpu=off 2>"$tmp/emu-off.err"
run --socket "$sock" --tokens 1,2,3 -n 12 --ids --quiet >"$tmp/emu.ids"
cat "$tmp/emu.err" "$tmp/emu2.err"
grep -q "^moe-run: GPU: moetierd's GPU tier is emulated" "$tmp/emu.err" || bad "emulated: no GPU line"
for r in emu emu2 emu-off; do
	cmp "$tmp/local.lg" "$tmp/$r.lg" || bad "$r: logits through the emulated GPU tier differ from --local"
done
cmp "$tmp/local.ids" "$tmp/emu.ids" || bad "emulated: greedy ids differ from --local"
# GPU-tier hits, or the GPU tier was not used: "hit rate host X% gpu Y%"
# (token by token: 192 layer calls, time enough for the copies up to land)
g=$(sed -n 's/.*hit rate host [0-9.]*% gpu \([0-9.]*\)%.*/\1/p' "$tmp/emu.err")
[ -n "$g" ] && awk -v g="$g" 'BEGIN { exit !(g > 0) }' || bad "emu: no GPU-tier hits (gpu '$g'%)"
grep -q 'hit rate host [0-9.]*% gpu 0\.0%' "$tmp/emu-off.err" || bad "--gpu=off: GPU-tier hits"
! grep -q 'GPU compute' "$tmp/emu.err" || bad "emulated: a device compute line"
daemon_stop

[ $fail -eq 0 ] && echo "test_moe_run_gpu: --gpu parses, fails clearly without a device, and changes no bit on the host"
exit $fail
