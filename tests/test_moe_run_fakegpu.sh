#!/bin/sh
# moe-run's device path without a GPU: moetierd's CUDA VMM arena and
# moe-run --gpu=on both on the fake driver (tests/fake_libcuda.c through
# MOETIER_LIBCUDA: device memory in host memory, VMM chunks as memfds, the
# ffn kernels computed on the CPU from their argument block, launch
# geometry checked), so everything above the driver runs as on a GPU: the
# export and its import into one reserved range, read-only; the refetch
# when a served slot is not mapped yet; the grouping of a layer call's GPU
# experts with their tokens and weights, several launches per layer call
# (one per acquire round) into one y; the leases held until the wait; y
# added to the host's sums.
#  - all experts fit the GPU arena, token by token and batched on 2
#    threads; then a GPU arena of a quarter of them (evictions: slots
#    refilled with other experts under the same mapping); then host and GPU
#    arenas of 13 slots each, batched: the GPU slots a layer call holds
#    also hold their host copies (an inclusive host tier), so without
#    progress the call must end its device batch and give them back (it
#    hung before it did);
#  - teacher-forced logits within 1e-3 of each row's scale of --local
#    (tests/logits-compare.py; the fake's f32 sums run in another order,
#    as a GPU's do; MOETIER_FFN_Q8=exact on both sides, as in
#    tests/moe-run-gpu.sh), greedy ids equal, device experts > 0;
#  - --gpu=off through the same daemon, and auto when moe-run finds no
#    driver (MOETIER_LIBCUDA pointing nowhere; --gpu=on then fails saying
#    so): bit-identical to --local.
# Skips (77) in a build without cuda.h or nvcc (no fake driver, no kernels).
set -eu
. "$(dirname "$0")/daemon-env.sh"
S=${MOETIER_SRCDIR:-..}
PY=/usr/bin/python3
fake=$B/tests/.libs/libfakecuda.so
[ -f "$fake" ] || { echo "test_moe_run_fakegpu: no $fake (a build without cuda.h): skip"; exit 77; }
grep -q '^#define HAVE_NVCC 1' "$B/config.h" || { echo "test_moe_run_fakegpu: built without nvcc (no kernels): skip"; exit 77; }
$PY -c 'import numpy' 2>/dev/null || { echo "test_moe_run_fakegpu: no numpy for logits-compare.py: skip"; exit 77; }
for p in moe-run moetierd moe-client tools/moe-gen tools/moe-pack; do
	[ -x "$B/$p" ] || { echo "test_moe_run_fakegpu: $B/$p is missing" >&2; exit 1; }
done

env_init moe-run-fakegpu
fail=0
bad() { echo "test_moe_run_fakegpu: FAIL: $*" >&2; fail=1; }
MOETIER_LIBCUDA=$fake
MOETIER_FFN_Q8=exact
export MOETIER_LIBCUDA MOETIER_FFN_Q8

# 4 MoE layers x 32 experts, top-4; Q8_0 experts of 6.4 KiB: one 64 KiB
# slot each at the fake's granularity
"$B/tools/moe-gen" model --family qwen3_moe --format gguf --dtype q8_0 --preset tiny --heads 4 --kv-heads 2 \
	--head-dim 16 --experts 32 --top-k 4 --layers 4 --seed 7 --out "$tmp/src" >/dev/null
"$B/tools/moe-pack" convert "$tmp/src/model.gguf" -o "$tmp/m.moepack" -q
run() { timeout -k 5 120 "$B/moe-run" "$tmp/m.moepack" "$@"; }
toks=$(seq -s, 1 60)
run --local --tokens "$toks" --dump-logits "$tmp/local.lg" --quiet
run --local --tokens 1,2,3 -n 16 --ids --quiet >"$tmp/local.ids"

# Every expert acquired on the GPU tier first (6 at a time; a GPU copy
# needs a host copy): moe-run then finds every slot's chunk at its start.
# Without it the daemon creates the chunks as the run fills slots, and
# moe-run fetches the export again to map each new one.
fill_gpu() {
	for l in 0 1 2 3; do
		for e in 0 6 12 18 24; do
			timeout 60 "$B/moe-client" --socket "$sock" acquire $l $(seq $e $((e + 5))) --gpu >/dev/null
		done
		timeout 60 "$B/moe-client" --socket "$sock" acquire $l 30 31 --gpu >/dev/null
	done
}

# check NAME: the device computed, within the tolerance, same greedy ids
check() {
	n=$(sed -n 's/^moe-run: GPU compute: \([0-9]*\) experts.*/\1/p' "$tmp/$1.err")
	[ -n "$n" ] && [ "$n" -gt 0 ] || bad "$1: no expert computed on the device: $(cat "$tmp/$1.err")"
	grep -q "^moe-run: GPU: the experts of moetierd's GPU tier are computed on fake CUDA device" "$tmp/$1.err" ||
		bad "$1: no device line"
	$PY "$S/tests/logits-compare.py" "$tmp/$1.lg" "$tmp/local.lg" --tol 1e-3 || bad "$1: logits beyond 1e-3"
}

for cfg in 1M:8M:fill 1M:2M:fresh 104K:832K:fresh 104K:832K:fill; do
	# host:GPU arenas:warm-up. 1M: 128 slots of 8 KiB. 8M: 128 slots of
	# 64 KiB, every expert; 2M: 32 slots, a quarter of them; 104K:832K 13
	# each. fill: fill_gpu first; fresh: chunks created during the run
	host=${cfg%%:*} gpu=${cfg#*:} warm=${cfg##*:}
	gpu=${gpu%:*} tag=$host-$gpu-$warm
	daemon_start moetierd "$tmp/m.moepack" --host-bytes=$host --gpu-bytes=$gpu --gpu-backend=vmm
	"$B/moe-client" --socket "$sock" info | grep 'GPU arena'
	if [ "$warm" = fill ]; then fill_gpu; fi
	run --socket "$sock" --gpu=on --tokens "$toks" --dump-logits "$tmp/g1-$tag.lg" --batch 1 2>"$tmp/g1-$tag.err" ||
		{ cat "$tmp/g1-$tag.err" >&2; exit 1; }
	MOETIER_RUN_SPLIT_MIN=0 run --socket "$sock" --gpu=on --tokens "$toks" --dump-logits "$tmp/g2-$tag.lg" -t 2 \
		--prefetch-depth 2 2>"$tmp/g2-$tag.err" || { cat "$tmp/g2-$tag.err" >&2; exit 1; }
	run --socket "$sock" --gpu=on --tokens 1,2,3 -n 16 --ids 2>"$tmp/ids-$tag.err" >"$tmp/g-$tag.ids" ||
		{ cat "$tmp/ids-$tag.err" >&2; exit 1; }
	run --socket "$sock" --gpu=off --tokens "$toks" --dump-logits "$tmp/off-$tag.lg" --batch 1 2>"$tmp/off-$tag.err"
	cat "$tmp/g1-$tag.err" "$tmp/g2-$tag.err" | grep -E '^moe-run: (GPU|experts)'
	check "g1-$tag"
	check "g2-$tag"
	# fresh: the chunks were made during the run, and mapped as they came
	x=$(sed -n 's/.*; \([0-9]*\) arena exports fetched).*/\1/p' "$tmp/g1-$tag.err")
	[ "$warm" = fill ] || [ "${x:-0}" -gt 1 ] || bad "$cfg: the arena export was fetched ${x:-0} times"
	cmp "$tmp/local.ids" "$tmp/g-$tag.ids" || bad "$cfg: greedy ids differ from --local"
	cmp "$tmp/local.lg" "$tmp/off-$tag.lg" || bad "$cfg: --gpu=off differs from --local"
	! grep -q 'GPU' "$tmp/off-$tag.err" || bad "$cfg: --gpu=off printed a GPU line"
	if [ "$cfg" = 1M:8M:fill ]; then
		# the same VMM tier, but no driver for moe-run: on fails saying
		# so, auto says why in one line and is the host's bits
		rc=0
		MOETIER_LIBCUDA=/nonexistent/libcuda.so.1 run --socket "$sock" --gpu=on --tokens 1,2 >"$tmp/nd.out" 2>&1 ||
			rc=$?
		[ $rc -eq 1 ] && grep -q '^moe-run: --gpu=on: no CUDA driver' "$tmp/nd.out" ||
			bad "--gpu=on without a driver: exit $rc: $(cat "$tmp/nd.out")"
		MOETIER_LIBCUDA=/nonexistent/libcuda.so.1 run --socket "$sock" --tokens "$toks" --dump-logits "$tmp/nd.lg" \
			--batch 1 2>"$tmp/nd.err"
		grep -q '^moe-run: GPU: not used (no CUDA driver' "$tmp/nd.err" || bad "auto without a driver: no line why"
		cmp "$tmp/local.lg" "$tmp/nd.lg" || bad "auto without a driver: logits differ from --local"
	fi
	daemon_stop
done

[ $fail -eq 0 ] && echo "test_moe_run_fakegpu: the device path on the fake driver matches the host within 1e-3"
exit $fail
