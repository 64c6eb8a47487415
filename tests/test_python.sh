#!/bin/sh
# The pure-Python binding (client/python/moetier.py) against a real daemon.
set -eu
B=${MOETIER_BUILDDIR:-.}
S=${MOETIER_SRCDIR:-.}
# Debian's python3 first (python3-numpy): the array and DLPack checks need
# numpy, and test_python.py exits 77 without it rather than pass.
PY=
for want in 'import ctypes, numpy' 'import ctypes'; do
	for p in /usr/bin/python3 python3; do
		if command -v "$p" >/dev/null 2>&1 && "$p" -c "$want" 2>/dev/null; then
			PY=$p
			break 2
		fi
	done
done
[ -n "$PY" ] || { echo "no python3: skipped"; exit 77; }
lib=$(cd "$B" && pwd)/client/.libs/libmoetier.so.0
[ -e "$lib" ] || { echo "libmoetier not built (shared libraries disabled?)" >&2; exit 1; }
tmp=$(mktemp -d "${TMPDIR:-/tmp}/moetier-py.XXXXXX")
pid=
cleanup() {
	[ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
	rm -rf "$tmp"
}
trap cleanup EXIT
"$B/tools/moe-gen" model --family qwen2_moe --preset tiny --experts 16 --out "$tmp/src" >/dev/null
"$B/tools/moe-pack" convert "$tmp/src" -o "$tmp/t.moepack" -q
mkdir -m 0755 "$tmp/run"
"$B/moetierd" --foreground --config= --socket="$tmp/run/s.sock" --socket-group= --host-bytes=1M \
	"$tmp/t.moepack" 2>"$tmp/log" &
pid=$!
i=0
until [ -S "$tmp/run/s.sock" ]; do
	i=$((i + 1))
	[ $i -lt 100 ] || { cat "$tmp/log" >&2; exit 1; }
	sleep 0.1
done
# In an ASan build libmoetier needs the ASan runtime loaded first; python
# itself is not instrumented, so leak checking is off for it.
asan=$(ldd "$lib" 2>/dev/null | awk '/libasan/ { print $3 }')
if [ -n "$asan" ]; then
	export LD_PRELOAD="$asan"
	export ASAN_OPTIONS="${ASAN_OPTIONS:-}:detect_leaks=0"
fi
MOETIER_LIB=$lib PYTHONPATH="$S/client/python" timeout 60 "$PY" -X faulthandler "$S/tests/test_python.py" "$tmp/run/s.sock" "$tmp/t.moepack"
