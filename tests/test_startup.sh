#!/bin/sh
# moetierd refuses what it cannot serve at start-up, at once and saying why:
# a FIFO given as the pack (opening it once blocked for a writer forever).
set -eu
B=${MOETIER_BUILDDIR:-.}
[ -x "$B/moetierd" ] || { echo "$B/moetierd not built" >&2; exit 77; }
tmp=$(mktemp -d "${TMPDIR:-/tmp}/moetier-startup.XXXXXX")
trap 'rm -rf "$tmp"' EXIT INT TERM
mkfifo "$tmp/f.moepack"
mkdir -m 0755 "$tmp/run"
rc=0
timeout 10 "$B/moetierd" --foreground --config= --socket="$tmp/run/s" --socket-group= "$tmp/f.moepack" \
	2>"$tmp/err" || rc=$?
cat "$tmp/err"
[ $rc -eq 1 ] || { echo "FAIL: exit $rc on a FIFO pack (124 = it blocked)"; exit 1; }
grep -q "f.moepack: not a regular file" "$tmp/err" || { echo "FAIL: no clear message"; exit 1; }
echo ok
