#!/bin/sh
# A MoLAE latent pack (moe-pack molae) is refused by moetierd with a clear
# message until the daemon serves latent experts (issue 15 items 3-4): it
# must not serve extents whose parts it cannot compute.
set -eu
B=${MOETIER_BUILDDIR:-.}
for p in tools/moe-gen tools/moe-pack moetierd; do
	[ -x "$B/$p" ] || { echo "$B/$p not built" >&2; exit 77; }
done
"$B/tools/moe-pack" molae --help 2>&1 | grep -q "not built" && { echo "moe-pack built without LAPACKE"; exit 77; }
tmp=$(mktemp -d "${TMPDIR:-/tmp}/moetier-molae.XXXXXX")
trap 'rm -rf "$tmp"' EXIT INT TERM
"$B/tools/moe-gen" model --family qwen3_moe --preset tiny-lm --format gguf --dtype f32 --out "$tmp/src" >/dev/null
"$B/tools/moe-pack" convert "$tmp/src/model.gguf" -o "$tmp/d.moepack" -q
"$B/tools/moe-pack" molae --rank 32 "$tmp/d.moepack" -o "$tmp/l.moepack" -q >/dev/null
mkdir -m 0755 "$tmp/run"
rc=0
timeout 20 "$B/moetierd" --foreground --config= --socket="$tmp/run/s" --socket-group= --host-bytes=2M \
	"$tmp/l.moepack" 2>"$tmp/err" || rc=$?
cat "$tmp/err"
[ $rc -eq 1 ] || { echo "FAIL: moetierd exited $rc on a latent pack (want 1)"; exit 1; }
grep -q 'MoLAE latent pack' "$tmp/err" || { echo "FAIL: no clear message"; exit 1; }
[ ! -e "$tmp/run/s" ] || { echo "FAIL: socket left behind"; exit 1; }
echo ok
