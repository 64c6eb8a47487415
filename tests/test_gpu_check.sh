#!/bin/sh
# scripts/gpu-check on a machine without a GPU: it must change nothing and
# exit 77 with the reason (where a GPU exists, the check itself is the test:
# run scripts/gpu-check; this one then skips).
src=${MOETIER_SRCDIR:-$(cd "$(dirname "$0")/.." && pwd)}
if { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; } || [ -e /dev/nvidia0 ]; then
	echo "a GPU is present: run scripts/gpu-check itself"
	exit 77
fi
out=$(timeout 60 "$src/scripts/gpu-check" /nonexistent/build 2>&1)
rc=$?
echo "$out"
[ $rc -eq 77 ] || { echo "FAIL: gpu-check exited $rc without a GPU (want 77)"; exit 1; }
echo "$out" | grep -q 'no NVIDIA GPU' || { echo "FAIL: gpu-check did not say why it skipped"; exit 1; }
[ ! -e /nonexistent/build ] || { echo "FAIL: gpu-check built something"; exit 1; }
echo "ok: gpu-check skips cleanly without a GPU"
