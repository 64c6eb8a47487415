#!/bin/sh
# Cache-aware ROUTE through the Python binding (tests/test_python_route.py)
# against a real daemon on a tiny generated qwen2_moe model.
set -eu
S=${MOETIER_SRCDIR:-.}
. "$S/tests/daemon-env.sh"
PY=
for p in /usr/bin/python3 python3; do
	if command -v "$p" >/dev/null 2>&1 && "$p" -c 'import ctypes' 2>/dev/null; then
		PY=$p
		break
	fi
done
[ -n "$PY" ] || { echo "no python3: skipped"; exit 77; }
lib=$(cd "$B" && pwd)/client/.libs/libmoetier.so.0
[ -e "$lib" ] || { echo "libmoetier not built (shared libraries disabled?)" >&2; exit 1; }
env_init py-route
"$B/tools/moe-gen" model --family qwen2_moe --preset tiny --experts 16 --top-k 4 --out "$tmp/src" >/dev/null
"$B/tools/moe-pack" convert "$tmp/src" -o "$tmp/t.moepack" -q
daemon_start moetierd "$tmp/t.moepack" --host-bytes=4M
# In an ASan build libmoetier needs the ASan runtime loaded first; python
# itself is not instrumented, so leak checking is off for it.
asan=$(ldd "$lib" 2>/dev/null | awk '/libasan/ { print $3 }')
if [ -n "$asan" ]; then
	export LD_PRELOAD="$asan"
	export ASAN_OPTIONS="${ASAN_OPTIONS:-}:detect_leaks=0"
fi
MOETIER_LIB=$lib PYTHONPATH="$S/client/python" timeout 60 "$PY" -X faulthandler "$S/tests/test_python_route.py" "$sock"
unset LD_PRELOAD
# moe-client route: the same decision from the command line
out=$("$B/moe-client" --socket "$sock" route 0 --keep 2 --margin 0.2 4 3 2 1.5 1.4 1 0.5 -3 -3 -3 -3 -3 -3 -3 -3 -3)
echo "$out"
echo "$out" | grep -q "substituted 1 of 4 slots" || { echo "FAIL: moe-client route did not substitute" >&2; exit 1; }
echo "$out" | grep -q "slot 3  expert 4 .* exact 3 .* substituted" || { echo "FAIL: slot 3 is not expert 4" >&2; exit 1; }
if "$B/moe-client" --socket "$sock" route 0 --keep 5 --margin 0.2 4 3 2 1.5 1.4 1 0.5 -3 -3 -3 -3 -3 -3 -3 -3 -3 \
	2>"$tmp/err"; then
	echo "FAIL: moe-client route accepted --keep 5 with k=4" >&2
	exit 1
fi
grep -q "keep-top J=5 must be 1..k (k=4)" "$tmp/err" || { cat "$tmp/err" >&2; exit 1; }
daemon_stop
echo "test_python_route: ok"
