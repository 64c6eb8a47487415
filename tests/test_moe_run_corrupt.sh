#!/bin/sh
# moe-run through moetierd on a pack whose layer-0 experts are corrupt: it
# must stop with an error naming the expert and the checksum, exit non-zero,
# and never print text computed from a corrupt expert.
set -eu
. "$(dirname "$0")/daemon-env.sh"
S=${MOETIER_SRCDIR:-$(cd "$(dirname "$0")/.." && pwd)}
for p in tools/moe-pack moetierd moe-run moe-client; do
	[ -x "$B/$p" ] || { echo "$B/$p not built" >&2; exit 77; }
done
model=
for g in "$S"/models/debian-moe-*.gguf; do [ -f "$g" ] && model=$g; done
[ -n "$model" ] || { echo "no trained model in models/"; exit 77; }
env_init corrupt
"$B/tools/moe-pack" convert "$model" -o "$tmp/m.moepack" -q
# 64 bytes of junk inside every layer-0 extent (index entries: 32 bytes, offset first)
python3 - "$tmp/m.moepack" "$("$B/tools/moe-pack" info "$tmp/m.moepack" | awk '/^experts:/ {print $2}')" <<'PY'
import struct, sys
f = open(sys.argv[1], "r+b")
h = f.read(4096)
index_offset, = struct.unpack_from("<Q", h, 624)
experts = int(sys.argv[2])
for i in range(experts):
    f.seek(index_offset + 32 * i)
    off, = struct.unpack_from("<Q", f.read(32), 0)
    f.seek(off + 100)
    f.write(b"\xff" * 64)
PY
daemon_start moetierd "$tmp/m.moepack" --host-bytes=2M
rc=0
"$B/moe-run" "$tmp/m.moepack" --socket "$sock" --prompt "This program" -n 8 >"$tmp/out" 2>"$tmp/err" || rc=$?
cat "$tmp/err"
[ $rc -ne 0 ] || { echo "FAIL: moe-run exited 0 on corrupt experts"; exit 1; }
grep -q 'layer 0.*expert [0-9]*:.*\(checksum\|EBADMSG\)' "$tmp/err" ||
	{ echo "FAIL: the error does not name the expert and the checksum"; exit 1; }
[ ! -s "$tmp/out" ] || [ "$(cat "$tmp/out")" = "This program" ] ||
	{ echo "FAIL: text was printed past the prompt: $(cat "$tmp/out")"; exit 1; }
kill -0 "$pid" || { echo "FAIL: the daemon died"; exit 1; }
echo "ok: moe-run refused the corrupt experts (rc=$rc)"
