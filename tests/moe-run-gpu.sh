#!/bin/sh
# moe-run's device path on a real GPU (run by scripts/gpu-check; exits 77
# with the reason where there is no GPU, no CUDA build or no trained model):
# moetierd with a CUDA VMM GPU arena, moe-run --gpu=on computing the
# experts of the GPU tier with kernels/ffn.cu on the imported arena, against
# moe-run --gpu=off (every expert on the host) on the trained model
# (models/debian-moe-*.gguf, the newest; or the GGUF given as $1):
#  - teacher-forced logits of 64 held-out tokens: per row, max |gpu - host|
#    over the vocabulary <= 1e-3 x max |host| (tests/logits-compare.py
#    --tol 1e-3), and the same argmax wherever the host's top two logits are
#    further apart than that;
#  - greedy decode of 32 tokens: the same ids;
#  - the run did use the device (the summary's "GPU compute: N experts" with
#    N > 0, and GPU-tier hits).
# Tolerance: both sides dequantize the same weights to f32 and accumulate
# in f32 (MOETIER_FFN_Q8=exact on both runs: the host then keeps x in f32
# for q8_0 as the GPU does), only in another order (the kernel's tiles and
# atomicAdd across a token's experts against the host's top-k ffn_axpy
# order): a relative error of a few 1e-7 per sum (tests/cuda_ffn_check.c
# allows 1e-4 per expert output), carried through 6 layers of attention
# and experts to about 1e-5 of the logits' scale. 1e-3 keeps two orders of
# magnitude above that, and far below what a wrong slot, weight, token or
# dequantization gives (errors of the order of the logits themselves).
set -eu
. "$(dirname "$0")/daemon-env.sh"
S=${MOETIER_SRCDIR:-..}
PY=/usr/bin/python3
skip() { echo "moe-run-gpu: SKIP: $*"; exit 77; }

grep -q '^#define HAVE_NVCC 1' "$B/config.h" 2>/dev/null || skip "$B was built without CUDA kernels (nvcc)"
if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; } &&
	[ ! -e /dev/nvidia0 ]; then
	skip "no NVIDIA GPU"
fi
gguf=${1:-}
if [ -z "$gguf" ]; then
	gguf=$(ls -t "$S"/models/debian-moe-*.gguf 2>/dev/null | head -1 || true)
fi
[ -n "$gguf" ] && [ -f "$gguf" ] || skip "no trained model (models/debian-moe-*.gguf)"
for p in moe-run moetierd moe-client tools/moe-pack; do
	[ -x "$B/$p" ] || { echo "moe-run-gpu: $B/$p is missing" >&2; exit 1; }
done
$PY -c 'import numpy' 2>/dev/null || skip "no numpy for tests/logits-compare.py"

env_init moe-run-gpu
"$B/tools/moe-pack" convert "$gguf" -o "$tmp/m.moepack" -q
export MOETIER_FFN_Q8=exact
run() { timeout -k 5 300 "$B/moe-run" "$tmp/m.moepack" "$@"; }

# 64 token ids spread over the vocabulary (real routing: a trained model)
toks=$(seq 0 63 | awk '{ printf "%s%d", (NR > 1 ? "," : ""), ($1 * 97 + 11) % 1500 }')
# the host reference: no daemon, every expert in memory
run --local --tokens "$toks" --dump-logits "$tmp/host.lg" --quiet
run --local --tokens 1,2,3,4 -n 32 --ids --quiet >"$tmp/host.ids"

# The GPU arena sized to one slot per expert (slots are rounded up to the
# VMM granularity, 2 MiB on an H100), and filled by acquiring every expert on
# the GPU tier first, so that the measured runs compute on the device (and
# moe-run maps every chunk at its start). The host arena holds every
# expert: a GPU copy needs a host copy (the host tier is inclusive).
L=$("$B/tools/moe-pack" info "$tmp/m.moepack" | sed -n 's/^layers: .*(\([0-9]*\) MoE.*/\1/p')
E=$("$B/tools/moe-pack" info "$tmp/m.moepack" | sed -n 's/^experts: *\([0-9]*\) per MoE layer.*/\1/p')
[ -n "$L" ] && [ -n "$E" ] || { echo "moe-run-gpu: no layer/expert count from moe-pack info" >&2; exit 1; }
# the slot stride (the expert rounded up to the device's granularity)
daemon_start moetierd "$tmp/m.moepack" --host-bytes=256M --gpu-bytes=64M --gpu-backend=vmm
stride=$("$B/moe-client" --socket "$sock" info | sed -n 's/^GPU arena: *[0-9]* slots of \([0-9]*\) bytes.*/\1/p')
daemon_stop
[ -n "$stride" ] || { echo "moe-run-gpu: no GPU arena in moe-client info" >&2; exit 1; }
daemon_start moetierd "$tmp/m.moepack" --host-bytes=256M --gpu-bytes=$((L * E * stride)) --gpu-backend=vmm
"$B/moe-client" --socket "$sock" info | tee "$tmp/info" | grep 'GPU arena'
l=0
while [ $l -lt "$L" ]; do
	e=0
	while [ $e -lt "$E" ]; do
		last=$((e + 15 < E - 1 ? e + 15 : E - 1))
		timeout 60 "$B/moe-client" --socket "$sock" acquire $l $(seq $e $last) --gpu >/dev/null
		e=$((last + 1))
	done
	l=$((l + 1))
done

fail=0
run --socket "$sock" --gpu=on --tokens "$toks" --dump-logits "$tmp/gpu.lg" 2>"$tmp/gpu.err" ||
	{ cat "$tmp/gpu.err" >&2; exit 1; }
run --socket "$sock" --gpu=on --tokens 1,2,3,4 -n 32 --ids 2>"$tmp/gpu-ids.err" >"$tmp/gpu.ids" ||
	{ cat "$tmp/gpu-ids.err" >&2; exit 1; }
run --socket "$sock" --gpu=off --tokens "$toks" --dump-logits "$tmp/off.lg" 2>"$tmp/off.err"
cat "$tmp/gpu.err"
n=$(sed -n 's/^moe-run: GPU compute: \([0-9]*\) experts.*/\1/p' "$tmp/gpu.err")
[ -n "$n" ] && [ "$n" -gt 0 ] || { echo "moe-run-gpu: FAIL: no expert was computed on the device" >&2; fail=1; }
grep -q "^moe-run: GPU: the experts of moetierd's GPU tier are computed on" "$tmp/gpu.err" ||
	{ echo "moe-run-gpu: FAIL: no device line" >&2; fail=1; }
# --gpu=off through the daemon is the host's bits
cmp "$tmp/host.lg" "$tmp/off.lg" || { echo "moe-run-gpu: FAIL: --gpu=off differs from --local" >&2; fail=1; }
$PY "$S/tests/logits-compare.py" "$tmp/gpu.lg" "$tmp/host.lg" --tol 1e-3 ||
	{ echo "moe-run-gpu: FAIL: GPU logits beyond the tolerance" >&2; fail=1; }
cmp "$tmp/host.ids" "$tmp/gpu.ids" || { echo "moe-run-gpu: FAIL: greedy ids differ" >&2; diff "$tmp/host.ids" "$tmp/gpu.ids" >&2 || true; fail=1; }
daemon_stop
[ $fail -eq 0 ] && echo "moe-run-gpu: the device path matches the host within 1e-3 of the logits' scale; greedy ids equal"
exit $fail
